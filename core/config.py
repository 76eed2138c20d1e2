"""YAML experiment configs: includes, schema defaults, environment variables, dotted and command-line overrides.

Built on OmegaConf. A config file is a YAML mapping; :func:`load_config` merges, in increasing precedence:

1. the **schema's defaults** (a dataclass: every key an experiment accepts, with its type and default);
2. the files named by a top-level ``include:`` (a path or a list of paths, relative to the including file), each
   loaded the same way (so includes nest; a cycle is an error), in order;
3. the file's own nested keys (``train: {epochs: 3}`` changes ``train.epochs`` and keeps the other ``train`` keys);
4. the file's **dotted keys** (``train.epochs: 3`` at the top level, the original HR-NAS configs'
   ``'model_kwparams.bn_momentum': 0.01``): a partial override of what the includes and the file set;
5. **command-line overrides**: ``--train.epochs 2``, ``--train.epochs=2`` or ``train.epochs=2`` (``-`` in names
   reads as ``_``); values are YAML (``2``, ``1e-3``, ``[64, 128]``, ``null``, ``true``).

A ``!include other.yml`` tag loads a file as the value of one key. **Environment variables**: OmegaConf's
``${oc.env:VAR}`` / ``${oc.env:VAR,default}``, and the shell style ``${VAR}`` / ``${VAR:-default}`` for names in
capitals (``[A-Z_][A-Z0-9_]*``; lower-case ``${a.b}`` stays an OmegaConf interpolation of another key).

Every error — an unknown key (named, with the keys that were expected), a value of the wrong type, a missing or
cyclic include, an unset variable without a default, a YAML syntax error — is one line of
:class:`retia.errors.RetiaError` naming the file (or ``command line``), the key and what was expected.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import RetiaError

__all__ = ["load_config", "load_layers", "parse_overrides", "to_dict", "to_yaml", "CONFIG_INCLUDE_KEY"]

CONFIG_INCLUDE_KEY = "include"
_SHELL_VAR = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::-([^}]*))?\}")
_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


# ---------------------------------------------------------------------------------------------------------------
# reading files
# ---------------------------------------------------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """Safe YAML loader with ``!include path`` (relative to the file being read)."""

    base_dir: Path = Path(".")
    stack: tuple[Path, ...] = ()


def _construct_include(loader: _Loader, node: yaml.Node) -> Any:
    rel = loader.construct_scalar(node)
    path = _resolve_path(str(rel), loader.base_dir, loader.stack[-1] if loader.stack else None)
    return _read_yaml(path, loader.stack)


_Loader.add_constructor("!include", _construct_include)


def _resolve_path(rel: str, base_dir: Path, source: Path | None) -> Path:
    path = Path(os.path.expanduser(rel))
    path = path if path.is_absolute() else base_dir / path
    if not path.is_file():
        where = f"config {source}: " if source else "config: "
        raise RetiaError(f"{where}include {rel!r}: file {path} does not exist")
    return path.resolve()


def _read_yaml(path: Path, stack: tuple[Path, ...] = ()) -> Any:
    """Parse one YAML file (``!include`` tags expanded), with one-line errors."""
    if path in stack:
        chain = " -> ".join(str(p.name) for p in (*stack, path))
        raise RetiaError(f"config {stack[-1]}: include cycle {chain}")
    try:
        text = path.read_text()
    except OSError as err:
        raise RetiaError(f"config {path}: cannot be read ({err.strerror or err})") from None
    loader_cls = type("_FileLoader", (_Loader,), {"base_dir": path.parent, "stack": (*stack, path)})
    try:
        return yaml.load(text, Loader=loader_cls)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err)
        raise RetiaError(f"config {path}: YAML syntax error{where}: {_one_line(problem)}") from None


def _expand_env(value: Any, source: str, key: str = "") -> Any:
    """Replace shell-style ``${VAR}`` / ``${VAR:-default}`` in every string of a parsed YAML tree."""
    if isinstance(value, dict):
        return {k: _expand_env(v, source, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, source, f"{key}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def sub(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        raise RetiaError(f"config {source}: {key}: environment variable {name} is not set "
                         f"(set it, or give a default: ${{{name}:-value}})")

    return _SHELL_VAR.sub(sub, value)


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    out: Any = value
    for part in reversed(dotted.split(".")):
        out = {part: out}
    return out


def load_layers(path: str | os.PathLike, _stack: tuple[Path, ...] = ()) -> list[tuple[str, dict[str, Any]]]:
    """The layers of ``path``, lowest precedence first: its includes' layers, its nested keys, its dotted keys.

    Each layer is ``(source, plain dict)``; merge them in order (what :func:`load_config` does)."""
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        if _stack:
            raise RetiaError(f"config {_stack[-1]}: include {str(path)!r}: file {p} does not exist")
        raise RetiaError(f"config {str(path)!r}: file does not exist")
    p = p.resolve()
    data = _read_yaml(p, _stack)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RetiaError(f"config {p}: expected a mapping of keys at the top level, got {type(data).__name__}")
    source = str(p)
    data = _expand_env(data, source)
    layers: list[tuple[str, dict[str, Any]]] = []
    includes = data.pop(CONFIG_INCLUDE_KEY, None)
    if includes is not None:
        if isinstance(includes, str):
            includes = [includes]
        if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
            raise RetiaError(f"config {p}: {CONFIG_INCLUDE_KEY} {includes!r}: expected a path or a list of paths")
        for inc in includes:
            inc_path = Path(os.path.expanduser(inc))
            inc_path = inc_path if inc_path.is_absolute() else p.parent / inc_path
            if not inc_path.is_file():
                raise RetiaError(f"config {p}: include {inc!r}: file {inc_path} does not exist")
            if inc_path.resolve() in (*_stack, p):
                chain = " -> ".join(x.name for x in (*_stack, p, inc_path.resolve()))
                raise RetiaError(f"config {p}: include cycle {chain}")
            layers.extend(load_layers(inc_path, (*_stack, p)))
    nested = {k: v for k, v in data.items() if not (isinstance(k, str) and "." in k)}
    dotted = {k: v for k, v in data.items() if isinstance(k, str) and "." in k}
    for k in nested:
        if not isinstance(k, str):
            raise RetiaError(f"config {p}: key {k!r}: expected a string")
    layers.append((source, nested))
    for k, v in dotted.items():  # one layer per dotted key: each is a partial override, in file order
        if any(not part for part in k.split(".")):
            raise RetiaError(f"config {p}: key {k!r}: expected dot-separated names")
        layers.append((source, _nest(k, v)))
    return layers


# ---------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------
def _parse_value(text: str) -> Any:
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    if isinstance(value, str) and _FLOAT.match(value):  # YAML 1.1 reads 1e-3 as a string
        return float(value)
    return value


def parse_overrides(args: Sequence[str], aliases: Mapping[str, str] | None = None) -> list[tuple[str, Any]]:
    """``["--train.epochs", "2", "search.rho=1e-3", "--seed=3"]`` → ``[("train.epochs", 2), ("search.rho", 0.001),
    ("seed", 3)]``. ``-`` in key names reads as ``_``; ``aliases`` maps other names (e.g. an entry point's old
    flags ``epochs``) to dotted keys. A flag without a value is an error."""
    aliases = dict(aliases or {})
    out: list[tuple[str, Any]] = []
    args = list(args)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            body = arg[2:]
            if "=" in body:
                key, text = body.split("=", 1)
            else:
                key = body
                if i + 1 >= len(args) or (args[i + 1].startswith("--") and not _FLOAT.match(args[i + 1])):
                    raise RetiaError(f"command line: {arg}: expected a value after it (--key value or --key=value)")
                i += 1
                text = args[i]
        elif "=" in arg and not arg.startswith("-"):
            key, text = arg.split("=", 1)
        else:
            raise RetiaError(f"command line: {arg!r}: expected an override --key value, --key=value or key=value")
        key = key.replace("-", "_")
        key = aliases.get(key, key)
        if not key or any(not part for part in key.split(".")):
            raise RetiaError(f"command line: {arg!r}: expected a dotted key such as train.epochs")
        out.append((key, _parse_value(text)))
        i += 1
    return out


# ---------------------------------------------------------------------------------------------------------------
# merging and validation
# ---------------------------------------------------------------------------------------------------------------
def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _schema_keys(node: Any) -> list[str]:
    try:
        return [str(k) for k in node.keys()]
    except Exception:  # noqa: BLE001 - not a mapping
        return []


def _explain(err: OmegaConfBaseException, source: str, base: DictConfig) -> RetiaError:
    """One line for an OmegaConf error: where, which key, what was expected."""
    key = getattr(err, "full_key", None) or ""
    msg = (getattr(err, "msg", None) or str(err)).split("\n")[0]
    from omegaconf.errors import ConfigKeyError, InterpolationResolutionError

    if isinstance(err, ConfigKeyError) and key:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        node = OmegaConf.select(base, parent) if parent else base
        keys = _schema_keys(node)
        expected = f"; expected one of {', '.join(keys)}" if keys else ""
        return RetiaError(f"{source}: unknown key {key!r}{expected}")
    if isinstance(err, InterpolationResolutionError):
        env = re.search(r"Environment variable '([^']+)' not found", msg)
        if env:
            return RetiaError(f"{source}: {key}: environment variable {env.group(1)} is not set "
                              f"(set it, or give a default: ${{oc.env:{env.group(1)},value}})")
        return RetiaError(f"{source}: {key}: {_one_line(msg)}")
    if "Merge error" in msg or "is not a subclass" in msg:
        return RetiaError(f"{source}: {key or 'a key'}: a single value where a mapping of keys is expected ({_one_line(msg)})")
    return RetiaError(f"{source}: {key + ': ' if key else ''}{_one_line(msg)}")


def _merge_layer(cfg: DictConfig, layer: Mapping[str, Any], source: str) -> DictConfig:
    try:
        return OmegaConf.merge(cfg, OmegaConf.create(dict(layer)))
    except OmegaConfBaseException as err:
        raise _walk_error(cfg, layer, source, err) from None


def _walk_error(cfg: DictConfig, layer: Mapping[str, Any], source: str, err: OmegaConfBaseException) -> RetiaError:
    """OmegaConf's merge error does not always carry the key (a scalar for a mapping): find it by hand."""
    if getattr(err, "full_key", None):
        return _explain(err, source, cfg)

    def walk(node: Any, value: Any, prefix: str) -> str | None:
        if not isinstance(value, Mapping):
            return None
        for k, v in value.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            child = node.get(k) if isinstance(node, DictConfig) and k in node else None
            if isinstance(child, DictConfig) and not isinstance(v, Mapping) and v is not None:
                return key
            found = walk(child, v, key)
            if found:
                return found
        return None

    key = walk(cfg, layer, "")
    if key:
        expected = ", ".join(_schema_keys(OmegaConf.select(cfg, key)))
        return RetiaError(f"{source}: {key}: expected a mapping of keys ({expected}), got a single value")
    return _explain(err, source, cfg)


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] | Iterable[tuple[str, Any]] = (),
                schema: Any = None, aliases: Mapping[str, str] | None = None) -> DictConfig:
    """Load ``path`` (optional), apply ``overrides`` and validate against ``schema``.

    ``overrides``: command-line strings (``["--train.epochs", "2"]``, see :func:`parse_overrides`) or
    ``(dotted key, value)`` pairs. ``schema``: a dataclass (type or instance) — its fields are the only keys
    accepted and give the defaults and types — or ``None`` (no validation). Returns a resolved, read-only
    :class:`omegaconf.DictConfig` (attribute access; :func:`to_dict` for plain dicts)."""
    if schema is not None:
        if not (dataclasses.is_dataclass(schema) or isinstance(schema, DictConfig)):
            raise TypeError(f"schema must be a dataclass, got {schema!r}")
        cfg = OmegaConf.structured(schema)
    else:
        cfg = OmegaConf.create({})
    layers = load_layers(path) if path is not None else []
    for source, layer in layers:
        cfg = _merge_layer(cfg, layer, f"config {source}")
    pairs = list(overrides)
    if pairs and isinstance(pairs[0], str):
        pairs = parse_overrides(pairs, aliases)  # type: ignore[arg-type]
    for key, value in pairs:
        cfg = _merge_layer(cfg, _nest(key, value), "command line")
    source = f"config {Path(path).resolve()}" if path is not None else "config"
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise _explain(err, source, cfg) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise RetiaError(f"{source}: key(s) {', '.join(missing)} have no value and no default: set them")
    OmegaConf.set_readonly(cfg, True)
    return cfg


def to_dict(cfg: DictConfig) -> dict[str, Any]:
    """A plain, resolved dict (enums as their names)."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]


def to_yaml(cfg: DictConfig) -> str:
    return OmegaConf.to_yaml(cfg, resolve=True)
