"""The registries of the builtin detection engine (kept in a module of their own, so no two modules import each other)."""
from fvcore.common.registry import Registry

__all__ = ["BACKBONE_REGISTRY", "META_ARCH_REGISTRY"]

BACKBONE_REGISTRY = Registry("BACKBONE")
BACKBONE_REGISTRY.__doc__ = "Backbone builders: fn(cfg) -> nn.Module with output_shape() and size_divisibility."

META_ARCH_REGISTRY = Registry("META_ARCH")
META_ARCH_REGISTRY.__doc__ = "Detector classes built from a config: cls(cfg) -> nn.Module."
