"""The run directory: its settings (config.json), and the rules for resuming and starting over."""

import json
import os
import time

CONFIG = "config.json"


class RunError(ValueError):
    """A run directory that cannot be used as asked; the message says what to do."""


def write_json(path: str, value) -> None:
    """Writes JSON to a temporary file and renames it into place: never half-written."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def prepare(model_dir: str, config: dict, fresh: bool, may_change=(), log=print) -> bool:
    """Makes `model_dir` ready for `config`; returns True when it resumes an earlier run.

    A directory holding a run with other settings (except those in `may_change`) is refused
    with the differing flags named. `fresh` moves an existing run aside to
    `<model_dir>.<UTC time>` and starts in an empty directory: nothing is deleted.
    """
    path = os.path.join(model_dir, CONFIG)
    if fresh and os.path.isdir(model_dir) and os.listdir(model_dir):
        aside = f"{model_dir.rstrip(os.sep)}.{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
        os.rename(model_dir, aside)
        log(f"--fresh: the earlier run in {model_dir} is kept as {aside}")
    if os.path.isfile(path):
        saved = read_json(path)
        changed = [k for k in sorted(set(saved) | set(config))
                   if k not in may_change and saved.get(k) != config.get(k)]
        if changed:
            listed = ", ".join(f"--{k} (run: {saved.get(k)!r}, now: {config.get(k)!r})"
                               for k in changed)
            raise RunError(f"{model_dir} holds a run with other settings: {listed}; rerun with "
                           "the run's flags to resume it, or add --fresh to start over "
                           "(the old run is kept)")
        write_json(path, {**saved, **{k: config[k] for k in may_change if k in config}})
        return True
    if os.path.isdir(model_dir) and os.listdir(model_dir):
        raise RunError(f"--model_dir {model_dir} is not empty and holds no {CONFIG}: choose a "
                       "new directory")
    os.makedirs(model_dir, exist_ok=True)
    write_json(path, config)
    return False
