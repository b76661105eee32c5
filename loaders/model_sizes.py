"""How many bytes each part of Z-Image takes, measured from the loaded modules: the numbers the
memory plan (placement) places. Blocks as they live on the GPU (in the compute dtype), in fp8 with
per-row scales, and packed (exponent_pack) as streaming lays their host copies out.
"""
from __future__ import annotations

import dataclasses
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelSizes:
    """Bytes in the compute dtype, per part; blocks in the order the model calls them."""
    transformer_stem: int
    transformer_blocks: tuple[tuple[str, int], ...]
    text_encoder_embedding: int  # the token table: looked up on the CPU when the encoder streams
    text_encoder_stem: int  # final norm and rotary tables
    text_encoder_blocks: tuple[int, ...]
    vae: int
    # Each block with its matrices in fp8 + per-row float32 scales (fp8 storage or fp8 matmuls).
    transformer_blocks_fp8: tuple[int, ...] = ()
    # Each block's pinned copy with its matrices packed (exponent_pack; computed for packed storage).
    transformer_blocks_packed: tuple[int, ...] = ()
    text_encoder_blocks_packed: tuple[int, ...] = ()

    def block_fp8(self, i: int) -> int:
        if self.transformer_blocks_fp8:
            return self.transformer_blocks_fp8[i]
        return fp8_bytes(self.transformer_blocks[i][1])

    def block_packed(self, i: int) -> int:
        """Packed size where measured, else bf16's (never smaller than what packing gives)."""
        if self.transformer_blocks_packed:
            return self.transformer_blocks_packed[i]
        return self.transformer_blocks[i][1]

    def blocks_from(self, lo: int, hi: int, stem: int) -> "ModelSizes":
        """These sizes with only blocks lo..hi-1 and the given stem (one device's share)."""
        return dataclasses.replace(self, transformer_stem=stem, transformer_blocks=self.transformer_blocks[lo:hi],
                                   transformer_blocks_fp8=self.transformer_blocks_fp8[lo:hi],
                                   transformer_blocks_packed=self.transformer_blocks_packed[lo:hi])

    @property
    def transformer(self) -> int:
        return self.transformer_stem + sum(b for _, b in self.transformer_blocks)

    @property
    def text_encoder(self) -> int:
        return self.text_encoder_embedding + self.text_encoder_stem + sum(self.text_encoder_blocks)

    @classmethod
    def of(cls, transformer, text_encoder, vae, dtype: torch.dtype, vae_dtype: torch.dtype,
           packed: bool = False, work_device: torch.device | None = None) -> "ModelSizes":
        """Sizes of loaded modules once in `dtype` (diffusers' ZImageTransformer2DModel, transformers'
        Qwen3Model, AutoencoderKL). `packed`: also measure each block packed, which reads every
        weight once (a pass the host copies then reuse), on `work_device` if given (a GPU)."""
        def nbytes(m, dt=dtype, fp8=False) -> int:
            total = 0
            for t in list(m.parameters()) + list(m.buffers()):
                if fp8 and t.ndim == 2 and t.is_floating_point():
                    total += t.numel() + t.shape[0] * 4
                else:
                    total += t.numel() * (dt.itemsize if t.is_floating_point() else t.element_size())
            return total
        names = transformer_block_names(transformer)
        blocks = tuple((name, nbytes(transformer.get_submodule(name))) for name in names)
        te_blocks = tuple(nbytes(layer) for layer in text_encoder.layers)
        emb = nbytes(text_encoder.embed_tokens)
        sizes = cls(nbytes(transformer) - sum(b for _, b in blocks), blocks, emb,
                   nbytes(text_encoder) - emb - sum(te_blocks), te_blocks, nbytes(vae, vae_dtype),
                   tuple(nbytes(transformer.get_submodule(name), fp8=True) for name in names))
        return sizes.with_packed(transformer, text_encoder, dtype, work_device) if packed else sizes

    def with_packed(self, transformer, text_encoder, dtype: torch.dtype,
                    work_device: torch.device | None = None) -> "ModelSizes":
        """These sizes with every block's and text encoder layer's packed size measured
        (`packed_bytes`), the exponents counted on `work_device` (None: where the weights are).
        Several blocks at once: on a CPU a histogram runs
        on one core (the 34 blocks took 17 s one after another on a 16-core host, 3 s on all of
        them); on a GPU (1.9 s on an H100 host) the threads overlap reading the file, 4 at most to
        bound GPU memory."""
        blocks = [transformer.get_submodule(name) for name, _ in self.transformer_blocks] + list(text_encoder.layers)
        cuda = work_device is not None and torch.device(work_device).type == "cuda"
        workers = max(1, min(len(blocks), 4 if cuda else os.cpu_count() or 1))
        with ThreadPoolExecutor(workers) as pool:
            packed = tuple(pool.map(lambda block: packed_bytes(block, dtype, work_device), blocks))
        n = len(self.transformer_blocks)
        return dataclasses.replace(self, transformer_blocks_packed=packed[:n], text_encoder_blocks_packed=packed[n:])


def transformer_block_names(transformer) -> list[str]:
    """Z-Image's repeated blocks in the order its forward calls them."""
    return ([f"noise_refiner.{i}" for i in range(len(transformer.noise_refiner))]
            + [f"context_refiner.{i}" for i in range(len(transformer.context_refiner))]
            + [f"layers.{i}" for i in range(len(transformer.layers))])


def packed_bytes(block, dtype: torch.dtype, work_device: torch.device | None = None) -> int:
    """Bytes of `block`'s pinned copy with its matrices packed, as streaming lays it out."""
    from .streaming import stage_layout  # streaming's imports are heavier than the planner needs
    tensors = dict(block.named_parameters()) | dict(block.named_buffers())
    return stage_layout(tensors, "packed", dtype, work_device=work_device).stage_bytes


def fp8_bytes(nbytes: int) -> int:
    """Bytes of a bf16 block stored as fp8 + per-row scales (scales are <1% for these widths)."""
    return nbytes // 2 + nbytes // 256
