"""Frequency blocks as tables: the id -> (block, local id) remap and the per-field sum.

A field cut into frequency blocks (:mod:`torchrec_dimgrow.data.blocks`) is looked up as one
table per block: :class:`BlockRemap` rewrites the field-level ``KeyedJaggedTensor`` into one
over the block keys, on device and without a host sync (the global id ``id + field offset``
finds its block by one ``searchsorted`` over every block's global start; the local id is
``id - block start``; one stable sort groups the values by (block, example) and a
``scatter_add`` counts the new lengths, so a bag whose ids fall in different blocks becomes
one bag per block). A :class:`~torchrec_dimgrow.modules.feature_groups.FeatureGroups`
adds the pooled outputs of a field's blocks back into one feature per field, so a consumer
still sees KJT in, KeyedTensor out, with the field keys. A configuration where no field is split runs neither: the remap returns its
input and the collection's output is passed through, bit for bit.

The remap itself reads nothing back to the host. The lookup behind it still needs the new
KJT's ids per key (TorchRec's ``length_per_key``, one small ``tolist``), which a batch from
the loader has precomputed (``from_lengths_sync``) and a remapped one computes in the
forward: one extra host read per step. Remapping in the data loader instead (``BlockRemap``
on the batch, then a model over the block keys) would move it off the training step.

:class:`BlockDimGrowCollection` is the search's collection over blocks: a stock
:class:`~torchrec_dimgrow.modules.collection.DimGrowEmbeddingBagCollection` whose tables
are the blocks (each with its own gates, dims, capacity and re-plans, sharded by the
planner as separate tables), behind the remap.
"""

from __future__ import annotations

import torch
import torch.fx
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from torchrec_dimgrow.config import AlignMode, DimGrowConfig
from torchrec_dimgrow.data.blocks import FieldBlocks
from torchrec_dimgrow.modules.collection import DimGrowEmbeddingBagCollection
from torchrec_dimgrow.modules.feature_groups import FeatureGroups


def remap_to_blocks(
    values: torch.Tensor,
    lengths: torch.Tensor,
    weights: torch.Tensor | None,
    field_offsets: torch.Tensor,
    global_starts: torch.Tensor,
    num_blocks: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Field-level (values, lengths, weights) -> block-level ones (TorchScript-able).

    ``lengths`` is key-major (``F * B``, as in a KJT); the result's lengths are
    ``num_blocks * B``, key-major over the blocks, and its values are local ids in the
    input's dtype, grouped by (block, example) in their input order.
    """
    num_fields = field_offsets.numel()
    batch = lengths.numel() // num_fields
    out_lengths = torch.zeros(num_blocks * batch, dtype=torch.int64, device=lengths.device)
    if batch == 0:
        return values, out_lengths.to(lengths.dtype), weights
    segment = torch.arange(lengths.numel(), device=values.device).repeat_interleave(
        lengths.long(), output_size=values.numel()
    )
    field = torch.div(segment, batch, rounding_mode="floor")
    example = segment - field * batch
    global_id = values.long() + field_offsets[field]
    block = torch.searchsorted(global_starts, global_id, right=True) - 1
    local = global_id - global_starts[block]
    new_segment = block * batch + example
    # int32 keys (there are num_blocks * batch segments): the CPU sort is 2.4x faster than on int64.
    order = torch.sort(new_segment.to(torch.int32), stable=True)[1]
    out_lengths.scatter_add_(0, new_segment, torch.ones_like(new_segment))
    out_weights = weights[order] if weights is not None else None
    return local[order].to(values.dtype), out_lengths.to(lengths.dtype), out_weights


# One leaf of an fx trace (the serving export's ``torchrec.fx`` pass), scripted as a whole.
torch.fx.wrap("remap_to_blocks")


class BlockRemap(nn.Module):
    """``KeyedJaggedTensor`` over the fields -> one over the blocks (identity if none is split)."""

    field_offsets: torch.Tensor
    global_starts: torch.Tensor

    def __init__(self, blocks: FieldBlocks) -> None:
        super().__init__()
        self.fields = list(blocks.fields)
        self.block_keys = blocks.names()
        self.split = blocks.split
        offsets = [0]
        for n in blocks.vocab_sizes[:-1]:
            offsets.append(offsets[-1] + int(n))
        starts = [o + s for o, ss in zip(offsets, blocks.starts) for s in ss]
        # Not persistent: derived from the blocks, so state dicts stay those of the tables.
        self.register_buffer("field_offsets", torch.tensor(offsets, dtype=torch.int64), persistent=False)
        self.register_buffer("global_starts", torch.tensor(starts, dtype=torch.int64), persistent=False)

    def forward(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        if not self.split:
            return features
        if not isinstance(features, torch.fx.Proxy) and features.keys() != self.fields:
            raise KeyError(f"BlockRemap: expected the keys {self.fields}, got {features.keys()}")
        remapped = remap_to_blocks(  # indexed, not unpacked: an fx trace sees one leaf call
            features.values(),
            features.lengths(),
            features.weights_or_none(),
            self.field_offsets,
            self.global_starts,
            len(self.block_keys),
        )
        return KeyedJaggedTensor(
            keys=self.block_keys, values=remapped[0], lengths=remapped[1], weights=remapped[2]
        )


def block_tables(blocks: FieldBlocks, width: int | dict[str, int]) -> list[EmbeddingBagConfig]:
    """One table per block, at its field's width (a dict: per field)."""
    widths = width if isinstance(width, dict) else dict.fromkeys(blocks.fields, width)
    return [
        EmbeddingBagConfig(
            num_embeddings=rows, embedding_dim=widths[blocks.fields[f]], name=name, feature_names=[name]
        )
        for name, rows, f in zip(blocks.names(), blocks.rows(), blocks.field_of())
    ]


class BlockDimGrowCollection(nn.Module):
    """A DimGrow search over frequency blocks: KJT over the fields in, one feature per field out.

    ``self.coll`` is the DimGrow collection whose tables are the blocks (what the
    controller, the sharding and the re-plan stores work on, as for any DimGrow
    collection); ``forward`` sums each field's blocks, ``forward_summed`` sums everything
    (what ``CTRModel(combine="sum")`` needs: exactly its sum over features).
    """

    def __init__(
        self,
        blocks: FieldBlocks,
        width: int | dict[str, int],
        config: DimGrowConfig | None = None,
        align: AlignMode = "project",
        is_weighted: bool = False,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if align == "raw" and blocks.split:
            raise ValueError("BlockDimGrowCollection: split fields need align='pad' or 'project'")
        self.blocks = blocks
        self.remap = BlockRemap(blocks)
        self.coll = DimGrowEmbeddingBagCollection(
            block_tables(blocks, width), config, align, is_weighted=is_weighted, device=device
        )
        # None when no field is split: the collection's output is the fields' already.
        self.field_sum = (
            FeatureGroups(blocks.names(), blocks.fields, blocks.field_of()) if blocks.split else None
        )
        if device is not None and torch.device(device).type != "meta":
            self.remap.to(device)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        blocks = self.remap(features)
        if isinstance(self.coll, DimGrowEmbeddingBagCollection):
            # The block sum inside the collection: in training, inside its batched projection.
            return self.coll(blocks, groups=self.field_sum)
        pooled = self.coll(blocks)  # a plain collection put in its place (``swap.export``)
        return pooled if self.field_sum is None else self.field_sum(pooled)

    def forward_summed(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.coll.forward_summed(self.remap(features))


class BlockLookup(nn.Module):
    """A plain TorchRec lookup over frequency blocks: field KJT -> remap -> stock EBC ``.ebc``.

    The retrained (and served) model's sparse part: ``.ebc`` holds one table per kept block at
    its found dim (blocks at 0 dims have no table and contribute nothing), and the output is
    its ``KeyedTensor`` over the block keys, which a concatenating consumer takes as is.
    ``torch.fx``-traceable (the remap is one leaf call), so the serving export scripts it.
    """

    def __init__(self, blocks: FieldBlocks, ebc: nn.Module) -> None:
        super().__init__()
        self.remap = BlockRemap(blocks)
        self.ebc = ebc

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self.ebc(self.remap(features))
