"""family name -> decoder class. Adding a family: a module with its block, one line here."""

from .gemma import GemmaDecoder
from .llama import Decoder

DECODERS = {"llama": Decoder, "gemma3": GemmaDecoder}
