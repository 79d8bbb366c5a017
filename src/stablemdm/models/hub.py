"""Where a Hugging Face model is read from: a folder, the local Hugging Face cache, or the Hub
when downloads are allowed (docs/hf.md, "No network unless asked").

Without `allow_downloads` the Hub client is never called: even with `local_files_only=True`
each of its calls builds request headers, and `huggingface_hub` fetches a registry from the
Hub for them. A Hub name is therefore looked up in the cache on disk here, and
`from_pretrained` is given the cached snapshot folder.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError


def hub_options(allow_downloads: bool) -> dict[str, bool]:
    """What every `from_pretrained` gets: local files only unless downloads are allowed."""
    return {"local_files_only": not allow_downloads}


def is_local(name: str) -> bool:
    """Whether `name` is meant as a folder: it exists, or it is written as a path."""
    return Path(name).exists() or name.startswith(("/", "./", "../", "~")) or name.count("/") > 1


def cached_folder(name: str, files: tuple[str, ...] = ("config.json",)) -> Path | None:
    """The snapshot folder of the Hub model `name` in the local Hugging Face cache that holds
    one of `files`, or None; read from disk only."""
    from huggingface_hub import try_to_load_from_cache

    for file in files:
        try:
            path = try_to_load_from_cache(name, file)
        except ValueError:  # not a valid repo id: it cannot be cached
            return None
        if isinstance(path, str):
            return Path(path).parent
    return None


def local_source(name: str, allow_downloads: bool, files: tuple[str, ...]) -> str:
    """What `from_pretrained` is given for `name`: `name` when it exists or may be downloaded,
    else its snapshot folder in the local cache (holding one of `files`). A missing folder,
    or an uncached name without `allow_downloads`, is a one-line ConfigError at once."""
    if Path(name).exists() or (allow_downloads and not is_local(name)):
        return name
    folder = None if is_local(name) else cached_folder(name, files)
    if folder is None:
        raise not_found(name, allow_downloads)
    return str(folder)


def not_found(name: str, allow_downloads: bool, err: Exception | None = None) -> ConfigError:
    """The one line for a model that could not be found, saying what the policy allowed."""
    from huggingface_hub import constants

    if is_local(name):
        return ConfigError(f"model folder {name} does not exist")
    if not allow_downloads:
        return ConfigError(
            f"model {name} is neither a local folder nor in the local Hugging Face cache, and "
            "stablemdm downloads nothing unless asked: set allow_downloads=true to fetch it "
            "from the Hub, or give model=FOLDER"
        )
    if constants.HF_HUB_OFFLINE:
        return ConfigError(
            f"model {name} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set, so "
            "it was not downloaded despite allow_downloads=true; unset HF_HUB_OFFLINE"
        )
    return ConfigError(f"model {name} could not be fetched from the Hub: {first_line(err)}")


def first_line(err: BaseException | None) -> str:
    """The first line of an error's message (its type when it has none)."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
