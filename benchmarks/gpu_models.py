"""Every method's training step on one device: img/s beside flat, host syncs per step, LSTM precision.

What only a GPU shows (GPU audit items 1, 8, 9): the DHNN LSTMs' dtype under autocast, how many
times a training step (forward, loss, backward) blocks on the device, and the heads' training
throughput against the flat model, back to back on the same random batch (random weights).

    python benchmarks/gpu_models.py                          # CUDA, bf16 autocast, batch 128, 20 steps
    python benchmarks/gpu_models.py --amp fp16 --steps 50
    python benchmarks/gpu_models.py --device cpu --steps 1 --batch-size 8 --amp none   # a tiny CPU check
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

from throughput import ROWS, build


def rows() -> list[tuple]:
    """The throughput rows of every method, each config once (HierNet trains one way), those on the
    fixed-depth tree after its flat row, then those on the variable-depth tree after theirs."""
    seen, out = set(), []
    for group in ("dhnn", "guo", "hiernet"):
        for label, config, variable, *over in ROWS[group]:
            if over or (config, variable) in seen:
                continue
            seen.add((config, variable))
            name = label if label.startswith(("flat", "HierNet")) else f"{group.upper()} {label}"
            out.append((name, config, variable))
    return sorted(out, key=lambda r: (r[2], not r[0].startswith("flat")))  # stable: keeps the rest in order


def count_syncs(step, device: torch.device) -> int | None:
    """Host–device synchronisations in one call of ``step`` (CUDA only: None elsewhere)."""
    if device.type != "cuda":
        step()
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--amp", choices=("bf16", "fp16", "none"), default="bf16")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps per model per round")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    device = torch.device(args.device)
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[args.amp]
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 1, 28, 28, device=device).contiguous(memory_format=torch.channels_last)
    runs = {}
    for label, config, variable in rows():
        model, opt, tax, clip = build(config, variable)
        model.to(device)
        leaves = torch.tensor(tax.leaves, device=device)
        targets = leaves[torch.arange(args.batch_size, device=device) % len(leaves)]
        scaler = torch.amp.GradScaler(device.type, enabled=amp is torch.float16)
        lstm_dtypes: set[torch.dtype] = set()
        for m in model.modules():
            if isinstance(m, torch.nn.LSTM):
                m.register_forward_hook(lambda mod, inp, out, seen=lstm_dtypes: seen.add(out[0].dtype))

        def fwd_bwd(model=model, targets=targets, scaler=scaler) -> torch.Tensor:
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = model.loss(model(images), targets)
            scaler.scale(loss).backward()
            return loss

        def step(model=model, opt=opt, clip=clip, scaler=scaler, fwd_bwd=fwd_bwd) -> None:
            opt.zero_grad(set_to_none=True)
            fwd_bwd()
            if clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            scaler.step(opt)
            scaler.update()

        step()  # warm-up (allocator, cuDNN plans)
        syncs = count_syncs(fwd_bwd, device)
        runs[label] = (step, syncs, lstm_dtypes)
    rates: dict[str, list[float]] = {label: [] for label in runs}
    for _ in range(args.rounds):
        for label, (step, _, _) in runs.items():
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rates[label].append(args.batch_size * args.steps / (time.perf_counter() - t0))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"train img/s on {name}, amp {args.amp}, batch {args.batch_size}, best of {args.rounds} rounds x "
          f"{args.steps} steps; syncs = host-device synchronisations in one forward+loss+backward")
    print("| method | train img/s | ratio to flat | syncs/step | LSTM output dtype |\n|---|---|---|---|---|")
    base = None
    for label, r in rates.items():
        best = max(r)
        if label.startswith("flat"):
            base = best
        _, syncs, dtypes = runs[label]
        kinds = ", ".join(sorted(str(d).replace("torch.", "") for d in dtypes)) or "–"
        print(f"| {label} | {best:.0f} | {best / base:.3f} | {'–' if syncs is None else syncs} | {kinds} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
