"""LLaDA Studio: `python app.py` starts the page on http://127.0.0.1:7860 with the bundled tiny model.

Parses the arguments, loads the model(s) and the back end, builds the page (llada_app/ui.py) and
launches it. Nothing heavy happens at import.
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from llada_app.loading import DEFAULT_MODEL
    from llada_app.studio import DEFAULT_ARM

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="masked-diffusion model: a local folder or a hub id (e.g. GSAI-ML/LLaDA-8B-Instruct)")
    p.add_argument("--arm", default=None,
                   help="autoregressive twin for the reversal-poem comparison (folder); default: the bundled "
                        "sonnets-arm when --model is the bundled model; 'none' disables it")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch", help="denoiser back end")
    p.add_argument("--onnx", default=None, metavar="DIR",
                   help="an existing ONNX export for --backend onnx (default: export once into a cache folder)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=7860, help="port to serve the page on")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds one chat/poem request may run")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch; 0 = auto (1 for a small model like the bundled one, where more "
                        "threads only wait on each other)")
    args = p.parse_args(argv)
    if args.arm is None:
        args.arm = DEFAULT_ARM if args.model == DEFAULT_MODEL else None
    elif args.arm.lower() == "none":
        args.arm = None
    return args


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    args = parse_args(argv)
    if os.path.isdir(args.model):  # a local model: no reason to touch the network
        os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from llada_app.loading import ModelLoadError
    from llada_app.studio import build_studio
    from llada_app.ui import build_app, launch

    try:
        studio = build_studio(args.model, args.arm, backend=args.backend, onnx_dir=args.onnx, device=args.device,
                              threads=args.threads, time_limit_s=args.time_limit)
    except ModelLoadError as e:
        sys.exit(f"error: {e}")
    demo = build_app(studio)
    print(f"ready in {time.perf_counter() - started:.1f} s (model, back end and page built)", flush=True)
    launch(demo, host=args.host, port=args.port, share=args.share)


if __name__ == "__main__":
    main()
