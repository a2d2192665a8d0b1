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
    from llada_app.loading import DEFAULT_ARM, DEFAULT_BASE, DEFAULT_MODEL

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL,
                   help="masked-diffusion model: a local folder or a hub id (e.g. GSAI-ML/LLaDA-8B-Instruct)")
    p.add_argument("--arm", default=None,
                   help="autoregressive twin for the reversal-poem comparison (folder); default: the bundled "
                        "sonnets-arm when --model is the bundled model; 'none' disables it")
    p.add_argument("--base", default=None,
                   help="the masked-diffusion model's pre-trained base (folder or hub id), on which the poem tab's "
                        "completion protocol runs; default: the bundled sonnets-mdm-base when --model is the bundled "
                        "model, else none (completion runs on --model); 'none' disables it")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch", help="denoiser back end")
    p.add_argument("--onnx", default=None, metavar="DIR",
                   help="an existing ONNX export for --backend onnx (default: export once into a cache folder)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="run the PyTorch back end through torch.compile at static shapes (CUDA graphs on a GPU; "
                        "compiled at start-up, seconds per shape); auto: on with CUDA, off on a CPU")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it to the network)")
    p.add_argument("--port", type=int, default=7860, help="port to serve the page on")
    p.add_argument("--share", action="store_true", help="also open a public gradio.live link")
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds one chat/poem request may run")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch; 0 = auto (1 for a small model like the bundled one, where more "
                        "threads only wait on each other)")
    args = p.parse_args(argv)
    if not args.time_limit > 0:
        p.error("--time-limit must be a positive number of seconds")
    if args.threads < 0:
        p.error("--threads must be >= 0 (0: auto)")
    if not 0 < args.port < 65536:
        p.error("--port must be in 1..65535")
    bundled = args.model == DEFAULT_MODEL
    for name, default in (("arm", DEFAULT_ARM), ("base", DEFAULT_BASE)):
        value = getattr(args, name)
        if value is None:
            value = default if bundled and os.path.isdir(default) else None
        elif value.lower() == "none":
            value = None
        setattr(args, name, value)
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
                              threads=args.threads, time_limit_s=args.time_limit, base=args.base,
                              compile=args.compile)
    except ModelLoadError as e:
        sys.exit(f"error: {e}")
    print(f"warmed up in {studio.warm_up():.1f} s (one chat answer and one poem)", flush=True)
    demo = build_app(studio)
    print(f"ready in {time.perf_counter() - started:.1f} s (model, back end and page built)", flush=True)
    try:
        launch(demo, host=args.host, port=args.port, share=args.share)
    except OSError as e:  # the port is taken, or the address cannot be bound
        sys.exit(f"error: cannot serve on {args.host}:{args.port}: {e}")


if __name__ == "__main__":
    main()
