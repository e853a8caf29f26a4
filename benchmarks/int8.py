"""INT8 ONNX against fp32 ONNX and eager PyTorch on this machine's CPU, for one trained checkpoint.

    python benchmarks/int8.py --ckpt outputs/runs/<run>/checkpoints/<best>.ckpt

Runs ``export.py formats=[onnx] quantize=int8`` (static INT8, calibrated on the run's training
images, accuracy compared on its test split), then times each runtime on the same preprocessed
test images at batch 1 and 32 (median of ``--repeats`` timed passes after a warm-up) and prints
a markdown table: images per second, speed-up over eager PyTorch, test accuracy, file size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def images_per_second(run: Callable[[np.ndarray], object], images: np.ndarray, batch: int, repeats: int) -> float:
    batches = [images[i : i + batch] for i in range(0, len(images) - batch + 1, batch)][: max(1, 64 // batch)]
    for chunk in batches[:2]:  # warm-up
        run(chunk)
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        for chunk in batches:
            run(chunk)
        timings.append((time.perf_counter() - started) / sum(len(c) for c in batches))
    return 1.0 / float(np.median(timings))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "int8" / time.strftime("%Y-%m-%d_%H-%M-%S"))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for both runtimes (default: all)")
    args = parser.parse_args()

    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "export.py"),
            f"ckpt={args.ckpt}",
            "formats=[onnx]",
            "quantize=int8",
            f"hydra.run.dir={args.out}",
        ],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        sys.exit(f"export.py failed:\n{done.stderr[-3000:]}")
    report = json.loads((args.out / "quantization.json").read_text())

    import onnxruntime
    from omegaconf import OmegaConf

    from transfer.data.images import load_rgb
    from transfer.inference.evaluate import evaluation_images
    from transfer.model.classifier import load_classifier

    classifier = load_classifier(args.ckpt, "cpu")
    table, indices, _ = evaluation_images(
        OmegaConf.create({"ckpt": args.ckpt, "data": None, "seed": None}), "test", classifier.task
    )
    images = np.stack([classifier.preprocess(load_rgb(table.paths[i])).numpy() for i in indices[:96]])
    images = np.concatenate([images] * -(-96 // len(images)))[:96]  # timing needs 64 images: repeat a small split
    threads = args.threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    model = classifier.model.eval()

    def eager(batch: np.ndarray) -> object:
        with torch.inference_mode():
            return model(torch.from_numpy(batch))

    def session_runner(path: Path) -> Callable[[np.ndarray], object]:
        session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return lambda batch: session.run(None, {"image": batch})

    runtimes = {
        "PyTorch eager (fp32)": (eager, report["fp32_acc"], None),
        "ONNX Runtime fp32": (session_runner(args.out / "model.onnx"), report["fp32_acc"], report["fp32_bytes"]),
        "ONNX Runtime INT8 (static)": (
            session_runner(args.out / "model.int8.onnx"),
            report["int8_acc"],
            report["int8_bytes"],
        ),
    }
    speeds = {
        name: {b: images_per_second(run, images, b, args.repeats) for b in (1, 32)}
        for name, (run, _, _) in runtimes.items()
    }
    base = speeds["PyTorch eager (fp32)"]
    print(f"Checkpoint {args.ckpt}; {report['images']} test images for accuracy, {threads} threads\n")
    print("| runtime | img/s batch 1 | img/s batch 32 | vs eager (batch 1 / 32) | test acc | file MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for name, (_, accuracy, size) in runtimes.items():
        s = speeds[name]
        print(
            f"| {name} | {s[1]:.1f} | {s[32]:.1f} | {s[1] / base[1]:.2f}x / {s[32] / base[32]:.2f}x | "
            f"{100 * accuracy:.2f}% | {'' if size is None else f'{size / 1e6:.1f}'} |"
        )
    print(
        f"\nINT8 - fp32 test accuracy: {100 * report['acc_delta']:+.2f} points; the two agree on "
        f"{100 * report['agreement']:.2f}% of the test images. Files: {args.out}"
    )


if __name__ == "__main__":
    main()
