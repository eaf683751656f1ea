"""The arithmetic of identity-aware curation, on arrays of embeddings grouped by identity.

Rows arrive sorted by identity; `starts` holds the first row of each identity (a run of equal labels).
Everything is vectorised over rows and identities (numpy `reduceat`, batched matrix products); no Python
loop runs once per row. `flows.identities` streams a quality table through these functions one chunk of
whole identities at a time and writes the results.

- **Quality-weighted centre.** An identity's centre is the normalised sum of its unit embeddings, each
  weighted by the image's quality *rank* in the table (its `cume_dist`, in (0, 1], at a resolution of
  1/65,536 of the score's range: `flows.identities.QualityRanks`): the best image counts
  about as much as one, the worst next to nothing. Why: a low-quality face's embedding is an unreliable
  sample of the identity (that is what the quality score predicts: its utility for recognition), and
  degraded embeddings drift together towards a common "bad image" direction rather than scattering
  around the identity. A rank, not the raw score, because scores of different models (and exits) live on
  different scales; the weight of an image does not depend on which model scored it, only on the order.
- **Leave-one-out similarity.** An image is compared with its identity's centre computed *without it*, so
  that it never vouches for itself: in an identity of three images, one wrong image would otherwise be a
  third of its own reference. For large identities it equals the plain centre's similarity.
- **Outliers**, with one refit: images below the threshold are left out of the centre, the centre is
  computed again, and the final similarities are taken to that centre (an M-estimate with a hard cut,
  so that a few mislabelled images do not drag the reference towards themselves).
- **Closer to another person (the rival margin).** An image below the similarity threshold is an outlier
  only if it is also not clearly closer to its own centre than to its *rival*, the nearest centre of
  another person (not a twin of its own: a centre at or above the merge threshold is the same person filed
  twice, reported as a merge candidate instead): its margin, own similarity minus the rival's, is below
  the margin threshold, or it is no nearer its own centre than a typical image is to a stranger's (the
  face of somebody not in the table is far from every centre, its own too). Why: a degraded face is far
  from every centre, its own included (occlusion, over-exposure: dlib's similarities all drop together),
  while a mislabelled one is near someone else's.
  The similarity alone cannot tell those apart; the margin does, and it is where quality weighting pays:
  a centre that the degraded images pull less sits nearer the person, so rivals are told apart better
  (docs/benchmarks.md, "Identity curation on real faces").
- **Near-duplicates**: within an identity, images are visited from the best quality down; an image is a
  duplicate when its cosine similarity to an image already kept reaches the threshold, and points to
  the best such image. Kept images are never near-duplicates of each other. (`flows.identities` passes
  the images at or above the outlier similarity: the ones the rival margin clears later take no part.)
- **Nearest identities**: the centres' nearest neighbours by inner product, exact (faiss `IndexFlatIP`)
  up to `EXACT_LIMIT` identities and an inverted-file index (`IndexIVFFlat`, 2 sqrt(n) lists, 32 probed)
  beyond, so that millions of identities take minutes, not hours; it may miss a nearest neighbour that the
  exact search finds (recall measured by benchmarks/bench_identities.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

EXACT_LIMIT = 200_000  # identities searched exhaustively (about a minute here); beyond, an IVF index
IVF_PROBES = 32  # inverted lists visited per query
IVF_TRAINING_PER_LIST = 40  # k-means training points per inverted list (faiss warns below 39)
MAX_CELLS = 1 << 24  # similarity cells of one batched product in `near_duplicates` (64 MB of float32)
LARGE_IDENTITY = 4_096  # larger identities are deduplicated in blocks (`_greedy_blocks`)
BLOCK = 512


def unit_rows(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows scaled to unit length as float32, which rows could be: finite and of non-zero length).
    Rows that cannot are zeros."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1)
    valid = np.isfinite(norms) & (norms > 0)
    units = np.zeros_like(vectors)
    units[valid] = vectors[valid] / norms[valid, None]
    return units, valid


def group_of(starts: np.ndarray, rows: int) -> np.ndarray:
    """The identity index of every row, from the identities' first rows."""
    return np.repeat(np.arange(len(starts)), np.diff(np.append(starts, rows)))


def weighted_sums(units: np.ndarray, weights: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Per identity, the weighted sum of its unit embeddings (float64: sums of many rows)."""
    if len(starts) == 0:
        return np.zeros((0, units.shape[1]))
    return np.add.reduceat(units.astype(np.float64) * weights[:, None], starts, axis=0)


def similarity_to_centre(
    units: np.ndarray, weights: np.ndarray, starts: np.ndarray, members: np.ndarray
) -> np.ndarray:
    """Every row's cosine similarity to its identity's weighted centre without the row itself (rows of
    weight 0 are not in the centre, so they meet the whole of it). NaN where the rest of the identity
    holds no member (`members`: rows that count in the centre, i.e. weight > 0) or the row has no
    embedding."""
    if len(starts) == 0:
        return np.zeros(0)
    group = group_of(starts, len(units))
    sums = weighted_sums(units, weights, starts)
    others = np.add.reduceat(members.astype(np.int64), starts)[group] - members  # members besides the row
    wide = units.astype(np.float64)
    # the rest of the identity, subtracted as vectors: expanding |S - w u|^2 would cancel catastrophically
    # when the others' weights are tiny next to the row's own
    rest = sums[group] - (weights * members)[:, None] * wide
    norm = np.linalg.norm(rest, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        similarity = np.einsum("ij,ij->i", wide, rest) / norm
    bad = (others < 1) | ~(norm > 0) | ~np.any(units, axis=1)
    similarity[bad] = np.nan
    return np.clip(similarity, -1.0, 1.0)


@dataclass
class Judged:
    """What `judge` finds for a chunk of identities."""

    similarity: np.ndarray  # per row: final leave-one-out similarity to the refitted centre (NaN: none)
    outlier: np.ndarray  # per row
    centres: np.ndarray  # per identity: unit centre without the outliers (zeros: no usable image)


def judge(
    units: np.ndarray, usable: np.ndarray, weights: np.ndarray, starts: np.ndarray, threshold: float
) -> Judged:
    """Similarities, outliers (similarity below `threshold`, after one refit without them) and centres.

    When every usable image of an identity falls below the threshold on the first fit (two images that
    disagree, say), the refit has nothing left: those images keep their first similarity and stay
    outliers, and the identity's centre is the first fit's."""
    first_weights = np.where(usable, weights, 0.0)
    first = similarity_to_centre(units, first_weights, starts, usable)
    rejected = usable & (first < threshold)
    kept = usable & ~rejected
    refit_weights = np.where(kept, weights, 0.0)
    second = similarity_to_centre(units, refit_weights, starts, kept)
    group = group_of(starts, len(units))
    refit_members = np.add.reduceat(kept.astype(np.int64), starts) if len(starts) else np.zeros(0, int)
    no_refit = refit_members[group] == 0
    # the refit's lone survivor has no one left to be compared with: it keeps its first similarity
    similarity = np.where(no_refit | np.isnan(second), first, second)
    similarity[~usable] = np.nan
    outlier = usable & (similarity < threshold)
    sums = weighted_sums(units, refit_weights, starts)
    fallback = weighted_sums(units, first_weights, starts)
    sums[refit_members == 0] = fallback[refit_members == 0]
    centres, _ = unit_rows(sums)
    return Judged(similarity=similarity.astype(np.float32), outlier=outlier, centres=centres)


def near_duplicates(
    units: np.ndarray,
    quality: np.ndarray,
    starts: np.ndarray,
    eligible: np.ndarray,
    threshold: float,
    max_cells: int = MAX_CELLS,
) -> np.ndarray:
    """For every row, the row it is a near-duplicate of (-1: none). Within an identity, eligible rows are
    visited by quality, best first (ties: row order, i.e. image_id); a row whose similarity to a row
    already kept is at least `threshold` is a duplicate of the best such row, otherwise it is kept.

    Identities are padded to the next power of two of their eligible count and handled in batches of
    equal padded size, one matrix product per batch and one vectorised step per position."""
    duplicate_of = np.full(len(units), -1, dtype=np.int64)
    rows = np.flatnonzero(eligible)
    if len(rows) < 2:
        return duplicate_of
    group = group_of(starts, len(units))[rows]
    rows = rows[np.lexsort((rows, -quality[rows], group))]  # by identity, then best quality first
    group = group_of(starts, len(units))[rows]
    first = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    sizes = np.diff(np.append(first, len(rows)))
    rank = np.arange(len(rows)) - np.repeat(first, sizes)
    padded = np.maximum(2, 1 << np.ceil(np.log2(np.maximum(sizes, 1))).astype(np.int64))
    for big in np.flatnonzero(sizes > LARGE_IDENTITY):  # one at a time, in blocks: memory not size^2
        members = rows[first[big] : first[big] + sizes[big]]
        _greedy_blocks(units, members, threshold, duplicate_of)
    for size in np.unique(padded[(sizes >= 2) & (sizes <= LARGE_IDENTITY)]):
        chosen = np.flatnonzero((padded == size) & (sizes >= 2) & (sizes <= LARGE_IDENTITY))
        step = max(1, max_cells // int(size * size))
        for at in range(0, len(chosen), step):
            _greedy(
                units, rows, first, sizes, rank, chosen[at : at + step], int(size), threshold, duplicate_of
            )
    return duplicate_of


def _greedy(
    units: np.ndarray,
    rows: np.ndarray,
    first: np.ndarray,
    sizes: np.ndarray,
    rank: np.ndarray,
    batch: np.ndarray,
    size: int,
    threshold: float,
    duplicate_of: np.ndarray,
) -> None:
    """`near_duplicates` for one batch of identities of the same padded size."""
    slots = np.full((len(batch), size), -1, dtype=np.int64)  # the row in each (identity, position)
    member = np.concatenate([np.arange(first[b], first[b] + sizes[b]) for b in batch])
    owner = np.repeat(np.arange(len(batch)), sizes[batch])
    slots[owner, rank[member]] = rows[member]
    valid = slots >= 0
    stacked = np.where(valid[..., None], units[np.maximum(slots, 0)], 0.0).astype(np.float32)
    close = np.matmul(stacked, stacked.transpose(0, 2, 1)) >= threshold
    kept = np.zeros_like(valid)
    for position in range(size):
        earlier = close[:, position, :position] & kept[:, :position]
        found = earlier.any(axis=1)
        kept[:, position] = valid[:, position] & ~found
        hit = valid[:, position] & found
        if hit.any():
            best = earlier[hit].argmax(axis=1)  # the first kept match: the best quality
            duplicate_of[slots[hit, position]] = slots[np.flatnonzero(hit), best]


def _greedy_blocks(
    units: np.ndarray, members: np.ndarray, threshold: float, duplicate_of: np.ndarray
) -> None:
    """`near_duplicates` for one large identity (`members` in visiting order), BLOCK rows at a time: each
    block against the images kept so far, then within itself; memory BLOCK x kept, not size^2."""
    kept = np.zeros((0, units.shape[1]), dtype=np.float32)
    kept_rows = np.zeros(0, dtype=np.int64)
    for start in range(0, len(members), BLOCK):
        block = members[start : start + BLOCK]
        vectors = units[block].astype(np.float32)
        earlier = (vectors @ kept.T) >= threshold if len(kept) else np.zeros((len(block), 0), bool)
        found = earlier.any(axis=1)
        if found.any():
            duplicate_of[block[found]] = kept_rows[earlier[found].argmax(axis=1)]  # the best kept match
        inside = (vectors @ vectors.T) >= threshold
        new = np.zeros(len(block), dtype=bool)
        for position in np.flatnonzero(~found):
            match = inside[position, :position] & new[:position]
            if match.any():
                duplicate_of[block[position]] = block[match.argmax()]
            else:
                new[position] = True
        kept = np.concatenate([kept, vectors[new]])
        kept_rows = np.concatenate([kept_rows, block[new]])


@dataclass
class Neighbours:
    index: np.ndarray  # per centre: the nearest other centre (-1: none)
    similarity: np.ndarray  # its inner product (NaN: none)
    method: str  # "exact" or "ivf<lists>,probe<n>"


class CentreIndex:
    """A faiss index of unit centres by inner product: exact (`IndexFlatIP`) up to EXACT_LIMIT centres, an
    inverted file (`IndexIVFFlat`, 2 sqrt(n) lists, IVF_PROBES probed) beyond."""

    def __init__(self, centres: np.ndarray, threads: int | None = None) -> None:
        import faiss

        if threads:
            faiss.omp_set_num_threads(threads)
        count, dimension = centres.shape
        data = np.ascontiguousarray(centres, dtype=np.float32)
        if count <= EXACT_LIMIT:
            self.index = faiss.IndexFlatIP(dimension)
            self.method = "exact"
        else:
            lists = int(min(65_536, max(64, 2 * math.sqrt(count))))
            self._quantizer = faiss.IndexFlatIP(dimension)  # the IVF index does not own it
            self.index = faiss.IndexIVFFlat(self._quantizer, dimension, lists, faiss.METRIC_INNER_PRODUCT)
            training = np.random.default_rng(0).choice(
                count, min(count, IVF_TRAINING_PER_LIST * lists), False
            )
            self.index.train(data[np.sort(training)])
            self.index.nprobe = IVF_PROBES
            self.method = f"ivf{lists},probe{IVF_PROBES}"
        self.index.add(data)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(similarities, centre indices), each (queries, k), best first; index -1 where fewer were found."""
        return self.index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def nearest_identities(centres: np.ndarray, threads: int | None = None) -> Neighbours:
    """Each unit centre's nearest other centre by cosine similarity (faiss)."""
    return nearest_in(CentreIndex(centres, threads), centres)


def nearest_in(index: CentreIndex, centres: np.ndarray) -> Neighbours:
    """`nearest_identities` with the index of `centres` already built (none for a lone centre)."""
    count = len(centres)
    similarity, found = index.search(centres, 2)
    own = np.arange(count)
    # the first hit is normally the centre itself; with exact ties it may come second
    pick = np.where(found[:, 0] == own, 1, 0)
    index_out = found[own, pick].astype(np.int64)
    similarity_out = similarity[own, pick].astype(np.float32)
    missing = (index_out < 0) | (index_out == own)
    index_out[missing] = -1
    similarity_out[missing] = np.nan
    return Neighbours(index_out, similarity_out, index.method)


RIVAL_HITS = 8  # centres searched per image for its rival: its own, its twins and the nearest others
RIVAL_BATCH = 4_096  # images searched at a time (their hits' centres: batch x RIVAL_HITS x dimension)


@dataclass
class Rivals:
    index: np.ndarray  # per image: the nearest centre of another person (-1: none among the hits)
    similarity: np.ndarray  # the image's cosine similarity to it (NaN: none)


def rivals(
    index: CentreIndex,
    centres: np.ndarray,
    units: np.ndarray,
    label: np.ndarray,
    twin_similarity: float,
    hits: int = RIVAL_HITS,
) -> Rivals:
    """For each unit embedding in `units`, filed under the centre `label`, the most similar centre of
    *another person*: neither its label's nor a twin of it (a centre whose cosine similarity to the
    label's reaches `twin_similarity`, the merge threshold: the same person filed twice, reported as a merge
    candidate instead). Searched among the `hits` nearest centres; none when all of them are the label or
    its twins (the image's neighbourhood is its own person)."""
    return rivals_for(index, centres, units, [label], twin_similarity, hits)[0]


def rivals_for(
    index: CentreIndex,
    centres: np.ndarray,
    units: np.ndarray,
    labels: list[np.ndarray],
    twin_similarity: float,
    hits: int = RIVAL_HITS,
) -> list[Rivals]:
    """`rivals` of the same images under each of several labellings, from one search."""
    out = [
        Rivals(np.full(len(units), -1, dtype=np.int64), np.full(len(units), np.nan, dtype=np.float32))
        for _ in labels
    ]
    labels = [np.asarray(label, dtype=np.int64) for label in labels]
    for start in range(0, len(units), RIVAL_BATCH):
        span = slice(start, start + RIVAL_BATCH)
        similarity, found = index.search(units[span], min(hits, len(centres)))
        rows = np.arange(len(found))
        for label, result in zip(labels, out, strict=True):
            own = label[span]
            twin = np.einsum("id,ikd->ik", centres[own], centres[np.maximum(found, 0)]) >= twin_similarity
            allowed = (found >= 0) & (found != own[:, None]) & ~twin
            first = allowed.argmax(axis=1)
            has = allowed.any(axis=1)
            result.index[span] = np.where(has, found[rows, first], -1)
            result.similarity[span] = np.where(has, similarity[rows, first], np.nan)
    return out


@dataclass
class MarginSample:
    genuine: np.ndarray  # an image's similarity to its own centre minus its rival's
    impostor: np.ndarray  # as if filed under a random other identity: that centre's minus the rival's
    stranger: np.ndarray  # the image's similarity to that random other identity's centre


def margin_sample(
    index: CentreIndex,
    centres: np.ndarray,
    units: np.ndarray,
    similarity: np.ndarray,
    label: np.ndarray,
    twin_similarity: float,
    seed: int,
) -> MarginSample:
    """Margins of correctly and wrongly filed images, from a sample of images (`units`, their similarity to
    their own centre `label`): the genuine margin is `similarity` minus the rival's similarity; the impostor
    margin files the same image under a random other centre (a simulated mislabel, the kind the rule is
    for): that centre's similarity minus the rival's excluding it and its twins. That rival is usually the
    image's own centre, which a mislabelled image would not be part of: its leave-one-out `similarity` is
    taken then (with few images per identity the whole centre would be much nearer). Images without a rival
    among their hits are left out."""
    rng = np.random.default_rng(seed)
    label = np.asarray(label, dtype=np.int64)
    other = (label + rng.integers(1, len(centres), size=len(label))) % len(centres)
    own, found = rivals_for(index, centres, units, [label, other], twin_similarity)
    genuine = similarity - own.similarity
    impostor_similarity = np.einsum("ij,ij->i", units, centres[other])
    rival_similarity = np.where(found.index == label, similarity, found.similarity)
    impostor = impostor_similarity - rival_similarity
    return MarginSample(
        genuine[np.isfinite(genuine)], impostor[np.isfinite(impostor)], impostor_similarity.astype(np.float64)
    )
