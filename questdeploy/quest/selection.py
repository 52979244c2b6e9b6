"""Which layers QuEST finetunes: data, not code edits.

TLA (time-embedding-aware): every ResNet's time-embedding projection (``*.time_emb_proj``); the global
``time_embedding`` MLP is not trained. CMA (attention-sensitive): the transformer feed-forward layers
(``ff.net.0.proj`` / ``ff.net.2``, the SD recipe); a UNet without transformer blocks (``UNet2DModel``)
falls back to its attention projections (the LSUN recipe's qkv).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..quant.wrap import matches_any


@dataclass
class SelectionPolicy:
    tla: tuple[str, ...] = ("*time_emb_proj",)
    cma: tuple[str, ...] = ("*.ff.net.0.proj", "*.ff.net.2")
    cma_fallback: tuple[str, ...] = ("*.to_q", "*.to_k", "*.to_v", "*.to_out.0")

    def select(self, layer_names) -> tuple[list[str], list[str]]:
        """(TLA layers, CMA layers) among the quantized layers' names."""
        names = list(layer_names)
        tla = [n for n in names if matches_any(n, self.tla)]
        cma = [n for n in names if matches_any(n, self.cma) and n not in tla]
        if not cma:
            cma = [n for n in names if matches_any(n, self.cma_fallback) and n not in tla]
        return tla, cma
