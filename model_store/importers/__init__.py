"""Importers that turn real checkpoints (timm, Hugging Face ViT, CLIP towers, PEFT LoRA, DINOv2 ONNX, gate weights)
into zoo models.

Imports only ``model_store``."""

from model_store.importers.clip import import_clip
from model_store.importers.dinov2_onnx import import_dinov2
from model_store.importers.hf_vit import import_hf_vit
from model_store.importers.peft_lora import import_peft
from model_store.importers.timm_checkpoint import import_timm

__all__ = ["import_clip", "import_dinov2", "import_hf_vit", "import_peft", "import_timm"]
