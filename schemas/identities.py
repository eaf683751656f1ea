"""The Parquet files of `fiqa identities` (OUTPUT/curation/), read by `fiqa select`, the report and other
tools: these names and types are a contract.

identity_images.parquet, one row per image of the quality table that has an identity, sorted by image_id:

| column       | type            | meaning                                                                  |
|--------------|-----------------|--------------------------------------------------------------------------|
| image_id     | string          | the quality table's image_id                                             |
| identity     | string          | its identity label                                                       |
| quality      | float32, null   | the score the centres were weighted by (`--by`)                          |
| similarity   | float32, null   | cosine similarity to its identity's quality-weighted centre, computed    |
|              |                 | without the image itself; null without an embedding or a usable score   |
|              |                 | (status ok, finite), or when the image is its identity's only usable one |
| outlier      | bool            | similarity below the outlier threshold, and a rival margin (similarity   |
|              |                 | minus rival_similarity) below the margin threshold, or no rival found,   |
|              |                 | or a similarity below the stranger threshold (identities.json)           |
| duplicate_of | string, null    | the image_id of the better copy kept when this image is a near-duplicate |
| rival_identity | string, null  | for images below the outlier similarity (every usable image with         |
|              |                 | `--all-rivals`): the nearest centre of another person (not a twin of its |
|              |                 | own: a merge candidate), often the right label of a mislabelled image;   |
|              |                 | null for the others or when none was found among the 8 nearest centres   |
| rival_similarity | float32, null | cosine similarity of the image to that centre                          |

identities.parquet, one row per identity, sorted by identity:

| column             | type          | meaning                                                            |
|--------------------|---------------|--------------------------------------------------------------------|
| identity           | string        |                                                                    |
| images             | int64         | its rows in the quality table                                      |
| usable             | int64         | scored (status ok) images with an embedding                        |
| outliers           | int64         |                                                                    |
| duplicates         | int64         |                                                                    |
| kept               | int64         | scored images (status ok, a finite score) that are neither         |
|                    |               | outliers nor duplicates: what `fiqa select --drop-outliers         |
|                    |               | --drop-duplicates` keeps of the identity without a quality rule    |
| nearest_identity   | string, null  | the identity whose centre is nearest to this one's                 |
| nearest_similarity | float32, null | cosine similarity of the two centres                               |
| merge_candidate    | bool          | nearest_similarity at or above the merge threshold                 |
"""

from __future__ import annotations

import pyarrow as pa

IDENTITY_IMAGES_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("identity", pa.string()),
        ("quality", pa.float32()),
        ("similarity", pa.float32()),
        ("outlier", pa.bool_()),
        ("duplicate_of", pa.string()),
        ("rival_identity", pa.string()),
        ("rival_similarity", pa.float32()),
    ]
)

IDENTITIES_SCHEMA = pa.schema(
    [
        ("identity", pa.string()),
        ("images", pa.int64()),
        ("usable", pa.int64()),
        ("outliers", pa.int64()),
        ("duplicates", pa.int64()),
        ("kept", pa.int64()),
        ("nearest_identity", pa.string()),
        ("nearest_similarity", pa.float32()),
        ("merge_candidate", pa.bool_()),
    ]
)
