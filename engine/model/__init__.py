"""Model definitions: the Llama-family decoder and its architecture config.

Models here are pure nn.Modules over flat token batches; weight loading (engine.loader) and
attention over the paged KV cache (engine.attention) are applied from outside. Projections
and the embedding may hold their weights as a checkpoint stores them (engine.model.stored).
"""
from engine.model.config import ModelArchConfig
from engine.model.llama import LlamaForCausalLM

__all__ = ["LlamaForCausalLM", "ModelArchConfig"]
