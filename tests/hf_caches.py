"""Local Hugging Face caches built offline for tests, in the layouts the installed libraries
resolve without a network: a `datasets` cache holding a Hub dataset (what a first online
`load_dataset` leaves), and a Hub cache holding a model snapshot (what `hf download` leaves).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"  # a commit hash, as the Hub names one


def cached_dataset(
    cache: Path, repo_id: str, config_name: str, splits: dict[str, list[dict[str, Any]]], features
) -> Path:
    """Write `splits` as the Hub dataset `repo_id` (config `config_name`) into the `datasets`
    cache folder `cache`: CACHE/namespace___name/CONFIG/0.0.0/HASH/ with one Arrow file per
    split and dataset_info.json, where `datasets`' offline fallback (its `cache` module)
    finds it. Returns that folder."""
    from datasets import DatasetInfo
    from datasets.arrow_writer import ArrowWriter
    from datasets.naming import camelcase_to_snakecase
    from datasets.splits import SplitDict, SplitInfo

    namespace, name = repo_id.split("/")
    name = camelcase_to_snakecase(name)  # as `datasets` names the folder and the files
    folder = cache / f"{namespace}___{name}" / config_name / "0.0.0" / SNAPSHOT
    folder.mkdir(parents=True)
    infos = SplitDict(dataset_name=name)
    for split, rows in splits.items():
        with ArrowWriter(features=features, path=str(folder / f"{name}-{split}.arrow")) as out:
            for row in rows:
                out.write(row)
            count, size = out.finalize()
        infos.add(SplitInfo(split, size, count, dataset_name=name))
    info = DatasetInfo(features=features, config_name=config_name, dataset_name=name)
    info.splits = infos
    info.write_to_directory(str(folder))
    return folder


def cached_model(hub_cache: Path, repo_id: str, model_folder: Path) -> Path:
    """Copy `model_folder` into the Hub cache `hub_cache` as the main revision of `repo_id`
    (models--org--name/snapshots/HASH, refs/main naming HASH). Returns the snapshot."""
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return Path(shutil.copytree(model_folder, repo / "snapshots" / SNAPSHOT))
