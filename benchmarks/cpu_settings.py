"""How much the toolkit's process settings matter: memory layout and glibc malloc behaviour.

Each configuration runs in a fresh process (malloc settings cannot be undone), on the same model,
batch and resolution, and the table compares them side by side:

    python benchmarks/cpu_settings.py [--model tf_efficientnet_lite0] [--batch 32] [--size 224]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CONFIGS = [  # (name, channels_last, malloc_tuning)
    ("NCHW, default malloc", False, False),
    ("channels_last, default malloc", True, False),
    ("channels_last, tuned malloc (toolkit default)", True, True),
]


def measure(model_name: str, batch: int, size: int, channels_last: bool, malloc_tuning: bool, steps: int) -> dict:
    import resource
    import time

    import timm
    import torch

    from transfer.training.runtime import keep_freed_memory

    if malloc_tuning:
        keep_freed_memory()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    model = timm.create_model(model_name, num_classes=2).to(memory_format=layout)
    images = torch.randn(batch, 3, size, size).contiguous(memory_format=layout)
    results = {}
    for mode in ("forward", "forward+backward"):

        def step(mode: str = mode) -> None:
            if mode == "forward":
                with torch.no_grad():
                    model.eval()(images)
            else:
                model.train()(images).sum().backward()

        step()  # warm-up
        before, started = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        for _ in range(steps):
            step()
        elapsed, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
        results[mode] = {
            "images_per_s": steps * batch / elapsed,
            "sys_over_user": (after.ru_stime - before.ru_stime) / max(1e-9, after.ru_utime - before.ru_utime),
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tf_efficientnet_lite0")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        channels_last, malloc_tuning = json.loads(args.child)
        print(json.dumps(measure(args.model, args.batch, args.size, channels_last, malloc_tuning, args.steps)))
        return
    rows = []
    for name, channels_last, malloc_tuning in CONFIGS:
        out = subprocess.run(
            [
                sys.executable,
                __file__,
                "--model",
                args.model,
                "--batch",
                str(args.batch),
                "--size",
                str(args.size),
                "--steps",
                str(args.steps),
                "--child",
                json.dumps([channels_last, malloc_tuning]),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        rows.append((name, json.loads(out.strip().splitlines()[-1])))
    base = rows[0][1]
    print(f"{args.model}, batch {args.batch}, {args.size}x{args.size}, {args.steps} steps per cell\n")
    print("| configuration | forward img/s | x | fwd+bwd img/s | x | fwd+bwd sys/user time |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, result in rows:
        f, fb = result["forward"], result["forward+backward"]
        print(
            f"| {name} | {f['images_per_s']:.1f} | {f['images_per_s'] / base['forward']['images_per_s']:.2f} "
            f"| {fb['images_per_s']:.1f} | {fb['images_per_s'] / base['forward+backward']['images_per_s']:.2f} "
            f"| {fb['sys_over_user']:.2f} |"
        )


if __name__ == "__main__":
    main()
