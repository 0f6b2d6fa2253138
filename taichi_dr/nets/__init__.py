"""Small PyTorch networks: input encodings and the fields and rendering networks built on them."""

from taichi_dr.nets.encodings import FrequencyEncoding, PositionalEncoding
from taichi_dr.nets.fields import GeometryNetwork, OccupancyNetwork
from taichi_dr.nets.radiance import RadianceField
from taichi_dr.nets.rendering import RenderingNetwork

__all__ = ["FrequencyEncoding", "GeometryNetwork", "OccupancyNetwork", "PositionalEncoding", "RadianceField",
           "RenderingNetwork"]
