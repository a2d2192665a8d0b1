"""ONNX export of LLaDA denoisers: `python -m export --help`. Nothing heavy is imported here."""
