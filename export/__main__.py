"""python -m export --model DIR|HUB_ID --out DIR: export a LLaDA denoiser to ONNX and check it."""
from __future__ import annotations

import argparse
import json
import sys


def parse_args(argv=None) -> argparse.Namespace:
    from llada_app.loading import DEFAULT_MODEL

    p = argparse.ArgumentParser(
        prog="python -m export", description=__doc__.split(":", 1)[1].strip(),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help="model folder or hub id")
    p.add_argument("--out", required=True, help="export folder to write (replaced if it is an older export)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="weights and activations of the graph (fp16 for GPUs; bf16 runs on few ORT kernels)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="where the model is traced and the parity check runs (ORT CPU or CUDA EP)")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="compare PyTorch and ONNX Runtime logits on random inputs; fail past the tolerance")
    p.add_argument("--with-past", action=argparse.BooleanOptionalAction, default=True,
                   help="also export model_with_past.onnx (K/V-cache graph for the prefix/dual cache modes)")
    p.add_argument("--fuse", action=argparse.BooleanOptionalAction, default=True,
                   help="fuse each RMSNorm (and the residual add before it) into one ONNX Runtime node; "
                        "--no-fuse keeps standard ONNX operators only")
    p.add_argument("--json", action="store_true", help="print the parity report as JSON")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from tqdm import tqdm

    from llada_app.backends import OnnxBackendError
    from llada_app.loading import ModelLoadError, load_model

    from .onnx_export import PARITY_FILE, ExportError, check_parity, export_onnx

    bar = tqdm(total=100, desc="loading model", bar_format="{desc:<40} {percentage:3.0f}%|{bar}| {elapsed}")

    def progress(base: float, span: float):
        def update(fraction: float, msg: str):
            bar.set_description_str(msg[:40])
            bar.n = round(base + span * fraction)
            bar.refresh()
        return update

    try:
        loaded = load_model(args.model, device=args.device, dtype=args.dtype)
        folder = export_onnx(loaded, args.out, dtype=args.dtype, device=args.device, opset=args.opset,
                             with_past=args.with_past, fuse=args.fuse, progress=progress(5, 65 if args.check else 95))
        report = None
        if args.check:
            report = check_parity(loaded, folder, device=args.device, progress=progress(70, 30))
    except (ModelLoadError, ExportError, OnnxBackendError) as e:
        bar.close()
        print(f"error: {e}", file=sys.stderr)
        return 1
    bar.close()
    if args.json:
        print(json.dumps(report or {"folder": str(folder), "checked": False}, indent=2))
    else:
        print(f"exported {loaded.name} ({args.dtype}) to {folder}")
        if report:
            print(f"parity ({report['providers'][0]}): max |Δlogits| {report['max_abs_diff']:.3g}, "
                  f"argmax agreement ≥ {report['min_argmax_agreement']:.4f}, "
                  f"{'passed' if report['passed'] else 'FAILED'}; details in {folder / PARITY_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
