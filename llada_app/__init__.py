"""LLaDA Studio: masked-diffusion language models you can chat with, watch, export and retrain.

Importing the package registers the LLaDA classes for `model_type="llada"` with transformers'
Auto* factories, so official checkpoints load with this project's code (never remote code).
"""
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

from .modeling import LLaDAConfig, LLaDAModelLM

AutoConfig.register("llada", LLaDAConfig, exist_ok=True)
AutoModel.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)
AutoModelForMaskedLM.register(LLaDAConfig, LLaDAModelLM, exist_ok=True)

__all__ = ["LLaDAConfig", "LLaDAModelLM"]
