"""Small PyTorch networks: input encodings and the fields and rendering networks built on them."""

from taichi_dr.nets.encodings import EncodingSettings, FrequencyEncoding, PositionalEncoding, position_encoding
from taichi_dr.nets.fields import GeometryNetwork, OccupancyNetwork
from taichi_dr.nets.hash_grid import HashGridEncoding
from taichi_dr.nets.radiance import RadianceField
from taichi_dr.nets.rendering import RenderingNetwork

__all__ = ["EncodingSettings", "FrequencyEncoding", "GeometryNetwork", "HashGridEncoding", "OccupancyNetwork",
           "PositionalEncoding", "RadianceField", "RenderingNetwork", "position_encoding"]
