"""The scoring plan: a deterministic, sorted listing cut into shards, saved in OUTPUT (`_plan.json`,
`_plan/listing.parquet`; schemas.layout) with fingerprints of the listing and of the scoring
configuration, and the rules for resuming against it.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import pyarrow.parquet as pq

from fiqa_curator.flows.sources import InputItem, items_to_table
from fiqa_curator.flows.storage import Output
from fiqa_curator.schemas.errors import UserError
from fiqa_curator.schemas.layout import LISTING_FILE, PLAN_FILE, SCORES, shard_name

PLAN_VERSION = 1


class PlanConflict(UserError):
    """OUTPUT holds results of another listing or configuration; mixing them needs --overwrite."""


def listing_fingerprint(items: list[InputItem]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(
            json.dumps(
                [item.image_id, item.source, item.offset, item.length, item.size, item.version, item.identity]
            ).encode()
        )
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
    items: list[InputItem] = field(default_factory=list, repr=False)

    @property
    def shard_count(self) -> int:
        return (self.item_count + self.shard_size - 1) // self.shard_size

    def shard_length(self, index: int) -> int:
        """How many items shard `index` holds (the listing itself is not needed)."""
        return max(0, min(self.shard_size, self.item_count - index * self.shard_size))

    def shard_items(self, index: int) -> list[InputItem]:
        return self.items[index * self.shard_size : (index + 1) * self.shard_size]

    def to_json(self) -> str:
        record = {k: v for k, v in asdict(self).items() if k != "items"}
        record["shards"] = [shard_name(i) for i in range(self.shard_count)]
        return json.dumps(record, indent=1, sort_keys=True)


def make_plan(
    input_url: str,
    input_kind: str,
    items: list[InputItem],
    shard_size: int,
    scoring_config: Mapping[str, Any],
) -> Plan:
    if shard_size < 1:
        raise UserError(f"shard size must be >= 1, got {shard_size}")
    ordered = sorted(items, key=lambda item: item.image_id)
    return Plan(
        input_url=input_url,
        input_kind=input_kind,
        item_count=len(ordered),
        shard_size=shard_size,
        listing_fingerprint=listing_fingerprint(ordered),
        config_fingerprint=config_fingerprint(scoring_config),
        scoring_config=dict(scoring_config),
        items=ordered,
    )


def save_plan(output: Output, plan: Plan) -> None:
    buffer = io.BytesIO()
    pq.write_table(items_to_table(plan.items), buffer)
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
    if existing.listing_fingerprint != new.listing_fingerprint:
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
