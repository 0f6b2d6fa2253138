"""Small PyTorch networks: input encodings and the fields and rendering networks built on them."""

from taichi_dr.nets.fields import GeometryNetwork, PositionalEncoding, RenderingNetwork

__all__ = ["GeometryNetwork", "PositionalEncoding", "RenderingNetwork"]
