"""The scoring plan: a deterministic, sorted listing cut into shards, saved in OUTPUT (`_plan.json`,
`_plan/listing.parquet`; schemas.layout) with fingerprints of the listing and of the scoring
configuration, and the rules for resuming against it.

The listing is an Arrow table (`sources.ITEM_SCHEMA`), sorted by image_id; shard `i` is its rows
`i * shard_size` up to the next shard's. Nothing here makes a Python object per image: sorting,
fingerprinting, saving and cutting into shards are Arrow and numpy operations.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from fiqa_curator.flows.sources import ITEM_SCHEMA, InputItem, in_id_order, items_to_table
from fiqa_curator.flows.storage import Output
from fiqa_curator.schemas.errors import UserError
from fiqa_curator.schemas.layout import LISTING_FILE, PLAN_FILE, SCORES, shard_name

# 2: the listing fingerprint is taken over Arrow columns (1: a JSON line per item; still recognised, so
# that an output planned by version 1 resumes)
PLAN_VERSION = 2
FINGERPRINT_ROWS = 65_536  # rows hashed at a time: the digest does not depend on how the table is chunked


class PlanConflict(UserError):
    """OUTPUT holds results of another listing or configuration; mixing them needs --overwrite."""


def _column_bytes(column: pa.ChunkedArray) -> list[bytes | pa.Buffer]:
    """A column's canonical bytes: which rows are null, then the values (strings: each one's length in
    bytes, then their UTF-8; integers: little-endian int64), whatever the chunks and offsets. Strings'
    bytes are a zero-copy view of Arrow's buffer."""
    values = column.combine_chunks()
    valid = np.packbits(pc.is_valid(values).to_numpy(zero_copy_only=False)).tobytes()
    if not pa.types.is_string(values.type):
        return [valid, pc.fill_null(values, 0).to_numpy(zero_copy_only=False).astype("<i8").tobytes()]
    filled = pc.fill_null(values, "")
    lengths = pc.binary_length(filled).to_numpy(zero_copy_only=False).astype("<i8")
    _, offset_buffer, data = filled.buffers()
    if data is None or len(filled) == 0:
        return [valid, lengths.tobytes(), b""]
    offsets = np.frombuffer(offset_buffer, dtype=np.int32)[filled.offset : filled.offset + len(filled) + 1]
    return [valid, lengths.tobytes(), data.slice(int(offsets[0]), int(offsets[-1] - offsets[0]))]


def listing_fingerprint(listing: pa.Table) -> str:
    """sha256 of a sorted listing (`sources.ITEM_SCHEMA`'s columns), FINGERPRINT_ROWS rows at a time."""
    digest = hashlib.sha256()
    for start in range(0, listing.num_rows, FINGERPRINT_ROWS):
        part = listing.slice(start, FINGERPRINT_ROWS)
        for name in ITEM_SCHEMA.names:
            digest.update(name.encode() + b"\0")
            for chunk in _column_bytes(part.column(name)):
                digest.update(len(chunk).to_bytes(8, "little"))  # pa.Buffer: its size
                digest.update(chunk)
    return digest.hexdigest()


def listing_fingerprint_v1(listing: pa.Table) -> str:
    """Plan version 1's fingerprint (a JSON line per item), to recognise an output planned by it."""
    digest = hashlib.sha256()
    keys = ("image_id", "source", "offset", "length", "size", "version", "identity")
    for batch in listing.to_batches(max_chunksize=FINGERPRINT_ROWS):
        for row in batch.to_pylist():
            digest.update(json.dumps([row[key] for key in keys]).encode())
            digest.update(b"\n")
    return digest.hexdigest()


def config_fingerprint(config: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


@dataclass
class Plan:
    input_url: str
    input_kind: str
    item_count: int
    shard_size: int
    listing_fingerprint: str
    config_fingerprint: str
    scoring_config: dict[str, Any]
    version: int = PLAN_VERSION
    listing: pa.Table | None = field(default=None, repr=False)  # None when loaded from OUTPUT

    @property
    def shard_count(self) -> int:
        return (self.item_count + self.shard_size - 1) // self.shard_size

    def shard_length(self, index: int) -> int:
        """How many items shard `index` holds (the listing itself is not needed)."""
        return max(0, min(self.shard_size, self.item_count - index * self.shard_size))

    def shard_listing(self, index: int) -> pa.Table:
        """Shard `index`'s items (`sources.ITEM_SCHEMA`), in image_id order."""
        assert self.listing is not None, "a plan loaded from OUTPUT has no listing"
        return self.listing.slice(index * self.shard_size, self.shard_size)

    def pending_listing(self, pending: Sequence[int]) -> pa.Table:
        """The items of the `pending` shards as one table with a `shard` column, each item's output shard."""
        tables = [ITEM_SCHEMA.append(pa.field("shard", pa.string())).empty_table()]
        for index in pending:
            part = self.shard_listing(index)
            tables.append(part.append_column("shard", pa.repeat(pa.scalar(shard_name(index)), part.num_rows)))
        return pa.concat_tables(tables).combine_chunks()

    def to_json(self) -> str:
        record = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "listing"}
        record["shards"] = [shard_name(i) for i in range(self.shard_count)]
        return json.dumps(record, indent=1, sort_keys=True)


def make_plan(
    input_url: str,
    input_kind: str,
    listing: pa.Table | Sequence[InputItem],
    shard_size: int,
    scoring_config: Mapping[str, Any],
) -> Plan:
    """The plan of a listing (an Arrow table with `sources.ITEM_SCHEMA`'s columns, or items)."""
    if shard_size < 1:
        raise UserError(f"shard size must be >= 1, got {shard_size}")
    table = listing if isinstance(listing, pa.Table) else items_to_table(list(listing))
    # a listing from `discover` is in order already: the plan then shares its buffers, no second copy
    ordered = in_id_order(table.select(ITEM_SCHEMA.names).cast(ITEM_SCHEMA))
    return Plan(
        input_url=input_url,
        input_kind=input_kind,
        item_count=ordered.num_rows,
        shard_size=shard_size,
        listing_fingerprint=listing_fingerprint(ordered),
        config_fingerprint=config_fingerprint(scoring_config),
        scoring_config=dict(scoring_config),
        listing=ordered,
    )


def save_plan(output: Output, plan: Plan) -> None:
    assert plan.listing is not None
    buffer = io.BytesIO()
    pq.write_table(plan.listing, buffer)
    output.commit_bytes(LISTING_FILE, buffer.getvalue())
    output.commit_bytes(PLAN_FILE, plan.to_json().encode())


def load_plan(output: Output) -> Plan | None:
    raw = output.read_bytes(PLAN_FILE)
    if raw is None:
        return None
    record = json.loads(raw)
    record.pop("shards", None)
    return Plan(**record)  # fingerprints and boundaries; the listing itself stays in LISTING_FILE


def reconcile(existing: Plan | None, new: Plan, *, overwrite: bool, has_results: bool) -> str:
    """Decide how a run proceeds: 'fresh', 'resume', or raise PlanConflict."""
    if existing is None:
        if has_results and not overwrite:
            raise PlanConflict(
                "OUTPUT already holds score files but no plan; use --overwrite to replace them"
            )
        return "fresh"
    differences = []
    same_listing = existing.listing_fingerprint == (
        listing_fingerprint_v1(new.listing)
        if existing.version == 1 and new.listing is not None
        else new.listing_fingerprint
    )
    if not same_listing:
        differences.append(
            f"the input listing changed ({existing.item_count} -> {new.item_count} items, "
            f"or their ids, sizes or versions)"
        )
    if existing.config_fingerprint != new.config_fingerprint:
        changed = sorted(
            k
            for k in set(existing.scoring_config) | set(new.scoring_config)
            if existing.scoring_config.get(k) != new.scoring_config.get(k)
        )
        differences.append(f"the scoring configuration changed ({', '.join(changed)})")
    if existing.shard_size != new.shard_size:
        differences.append(f"the shard size changed ({existing.shard_size} -> {new.shard_size})")
    if not differences:
        return "resume"
    if overwrite:
        return "fresh"
    raise PlanConflict(
        "OUTPUT holds results of a different plan: "
        + "; ".join(differences)
        + ". Refusing to mix them: use another OUTPUT, or --overwrite to replace the old results."
    )


def committed_shards(output: Output) -> set[str]:
    return {posixpath.splitext(name)[0] for name in output.list(SCORES) if name.endswith(".parquet")}
