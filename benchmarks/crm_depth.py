"""Why CRM costs top-1 on Tiny-ImageNet's WordNet tree (leaves at depths 1-12) and not on balanced trees.

No trained runs needed: every number is an expectation under a *calibrated* end-class distribution q
(the truth is drawn from q, so top-1 of an answer a is q(a) and every severity is a q-weighted mean),
for two families of q over the same 200 leaves:

* ``hier``: hierarchical logits, each node a standard normal, a leaf's logit the sum over its root path
  divided by sqrt(depth) (every leaf the same variance; leaves that share ancestors are correlated, as a
  network's near classes are), times a sharpness β;
* ``dirichlet``: q ~ Dirichlet(α) over the leaves (no hierarchy in q at all).

β and α are set so that mean top-1 (argmax) is 28.4 %, flat's measured Tiny-ImageNet top-1 (and, for
contrast, 75 %, where the CRM paper's and BiLT's models sit). Each q is
decoded on the WordNet tree and on the same tree *padded* to depth 12 (each shallow leaf extended by a
chain of single children down to depth 12: the same leaves, the same LCAs, but every leaf at one depth,
so an LCA's height is 12 minus its depth).

    PYTHONPATH=src python benchmarks/crm_depth.py            # about 2 min on one core
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from hiervision.bayes import bayes_nodes
from hiervision.data.tiny_imagenet import tiny_imagenet_taxonomy
from hiervision.taxonomy import Taxonomy

TOP1 = (0.284, 0.75)  # flat's test top-1 on Tiny-ImageNet 32x32 (benchmarks/RESULTS.md, comparison); BiLT-like


def padded(tax: Taxonomy) -> tuple[Taxonomy, list[int]]:
    """The tree with every leaf extended by single children down to the deepest depth; the new leaf of
    each old leaf, in ``tax.leaves`` order."""
    names, parents = list(tax.names), list(tax.parents)
    ends = []
    for leaf in tax.leaves:
        node = leaf
        for k in range(tax.max_depth - tax.depths[leaf]):
            names.append(f"{tax.names[leaf]}~{k}")
            parents.append(node)
            node = len(names) - 1
        ends.append(node)
    return Taxonomy(names, parents), ends


def leaf_q(rng: np.random.Generator, tax: Taxonomy, kind: str, n: int, sharp: float) -> np.ndarray:
    """``(n, C)`` end-class distributions over ``tax.leaves``."""
    leaves = np.asarray(tax.leaves)
    if kind == "dirichlet":
        return rng.dirichlet(np.full(len(leaves), sharp), size=n)
    anc = np.zeros((len(leaves), tax.num_nodes))
    for i, leaf in enumerate(leaves):
        anc[i, list(tax.path(int(leaf)))] = 1 / np.sqrt(tax.depths[leaf])
    logits = sharp * rng.standard_normal((n, tax.num_nodes)) @ anc.T
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def tune(rng_seed: int, tax: Taxonomy, kind: str, top1: float) -> float:
    """Sharpness (β, or α for Dirichlet) whose mean max q is ``top1``, by bisection on a fixed sample."""
    lo, hi = (0.1, 50.0) if kind == "hier" else (1e-4, 1.0)
    for _ in range(40):
        mid = (lo * hi) ** 0.5
        top = leaf_q(np.random.default_rng(rng_seed), tax, kind, 4000, mid).max(1).mean()
        sharper = (top < top1) == (kind == "hier")  # a larger β sharpens, a larger α flattens
        lo, hi = (mid, hi) if sharper else (lo, mid)
    return (lo * hi) ** 0.5


def lca_tables(tax: Taxonomy, ends: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """``(C, C)`` LCA height and true-path levels missed (depth(t) − depth(lca)) between end classes
    (row: answer, column: truth)."""
    c = len(ends)
    height, missed = np.zeros((c, c)), np.zeros((c, c))
    for i, a in enumerate(ends):
        for j, t in enumerate(ends):
            lca = tax.lca(a, t)
            height[i, j], missed[i, j] = tax.heights[lca], tax.depths[t] - tax.depths[lca]
    return height, missed


def report(q: np.ndarray, tax: Taxonomy, ends: list[int], answers: np.ndarray, height: np.ndarray,
           missed: np.ndarray, depth_of: np.ndarray) -> dict:
    rows = np.arange(len(q))
    right = q[rows, answers]
    wrong = (1 - right).sum()
    return {"top1": float(right.mean()),
            "mistake_severity": float((q * height[answers]).sum() / wrong),
            "depth_severity": float((q * missed[answers]).sum() / wrong),
            "hdist@1": float((q * height[answers]).sum(1).mean()),
            "answer_depth": float(depth_of[answers].mean())}


def run(kind: str, top1: float, seed: int, n: int) -> dict:
    wordnet = tiny_imagenet_taxonomy()
    sharp = tune(seed + 1, wordnet, kind, top1)
    q = leaf_q(np.random.default_rng(seed), wordnet, kind, n, sharp)
    depth_of = np.array([wordnet.depths[leaf] for leaf in wordnet.leaves])  # the *WordNet* depth of each class
    out = {"sharpness": sharp}
    for name, (tax, ends) in {"wordnet": (wordnet, list(wordnet.leaves)), "padded": padded(wordnet)}.items():
        full = np.zeros((n, tax.num_nodes))
        full[:, ends] = q
        col = {node: i for i, node in enumerate(ends)}
        height, missed = lca_tables(tax, ends)
        rules = {"argmax": q.argmax(1)}
        for rule, metric in (("crm", "severity"), ("bayes_hf1", "hf1")):
            rules[rule] = np.array([col[int(v)] for v in bayes_nodes(full, tax, metric)])
        res = {r: report(q, tax, ends, a, height, missed, depth_of) for r, a in rules.items()}
        moved = rules["crm"] != rules["argmax"]
        res["crm_changes"] = {
            "share": float(moved.mean()),
            "argmax_depth": float(depth_of[rules["argmax"][moved]].mean()) if moved.any() else None,
            "crm_depth": float(depth_of[rules["crm"][moved]].mean()) if moved.any() else None,
            # the height of the answer's parent: how costly a near miss of that answer is under LCA height
            "argmax_parent_height": float(np.mean([tax.heights[tax.parents[ends[a]]]
                                                   for a in rules["argmax"][moved]])) if moved.any() else None,
            "crm_parent_height": float(np.mean([tax.heights[tax.parents[ends[a]]]
                                                for a in rules["crm"][moved]])) if moved.any() else None,
        }
        out[name] = res
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=10000, help="images (draws of q) per family")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write every number here")
    args = p.parse_args()
    result = {f"{kind}@{top1}": run(kind, top1, args.seed, args.n) for kind in ("hier", "dirichlet") for top1 in TOP1}
    print("| q | tree | rule | top-1 % | mistake sev. (LCA height) | depth sev. | hdist@1 | answer depth |")
    print("|---|---|---|---|---|---|---|---|")
    for key, res in result.items():
        for tree in ("wordnet", "padded"):
            for rule in ("argmax", "crm", "bayes_hf1"):
                r = res[tree][rule]
                print(f"| {key} | {tree} | {rule} | {100 * r['top1']:.2f} | {r['mistake_severity']:.2f} | "
                      f"{r['depth_severity']:.2f} | {r['hdist@1']:.2f} | {r['answer_depth']:.2f} |")
    print("\n| q | tree | CRM changes the answer | mean depth argmax → CRM | parent height argmax → CRM |")
    print("|---|---|---|---|---|")
    for key, res in result.items():
        for tree in ("wordnet", "padded"):
            c = res[tree]["crm_changes"]
            print(f"| {key} | {tree} | {100 * c['share']:.1f} % | {c['argmax_depth']:.2f} → {c['crm_depth']:.2f} | "
                  f"{c['argmax_parent_height']:.2f} → {c['crm_parent_height']:.2f} |")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
