"""Write a shmps model spec from a PyTorch module, so that nobody writes one by hand.

    python3 -m shmps.spec MODULE:FACTORY [--name NAME] [--optimizer sgd --lr 0.05 ...] > model.toml

MODULE is an importable module (`mypkg.models`) or a path to a Python file (`models/net.py`);
FACTORY is a function or class in it that, called with no arguments, returns a torch.nn.Module.
Every parameter of the module becomes a `[[param]]` under its `named_parameters()` name and shape;
every nn.Embedding / nn.EmbeddingBag built with `sparse=True` becomes a `[[table]]` (pulled and
pushed by row). All of them get `init = "put"`: the job's rank 0 puts its freshly initialised
module (shmps.torch.ParameterServer does), and the other ranks wait for it, as DDP broadcasts
rank 0's weights. Buffers (batch-norm running statistics, for example) are not parameters: they
stay in each worker's module, and the spec says so.

The sparse embeddings may have an optimizer of their own (`--table-optimizer rowwise_adagrad
--table-lr 0.1`; from Python `table_optimizer={"kind": "rowwise_adagrad", "lr": 0.1}`), as
embedding trainers usually give them row-wise AdaGrad and the dense layers Adam or SGD.

From Python: `shmps.torch.spec(model, name=..., optimizer=..., lr=...)` returns the same text.
"""

import argparse
import importlib
import importlib.util
import math
import os
import re
import sys

# The spec format's limits (server/include/shmps/server/model_spec.hpp): names of 1 to 63 bytes
# with no spaces or control characters, 1 to 8 dimensions.
_MAX_NAME_BYTES = 63
_MAX_DIMS = 8
_SEGMENT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,62}$")

# The server's optimizer kinds and the keys each one takes (a key a kind does not use is an
# error in the spec, so only these are written).
OPTIMIZER_KEYS = {
    "sgd": (),
    "momentum": ("momentum",),
    "nesterov": ("momentum",),
    "adagrad": ("eps",),
    "rmsprop": ("rho", "eps"),
    "adam": ("beta1", "beta2", "eps"),
}
# A table's own optimizer may also be row-wise AdaGrad (one accumulator per row).
TABLE_OPTIMIZER_KEYS = dict(OPTIMIZER_KEYS, rowwise_adagrad=("eps",))
_COMMON_KEYS = ("weight_decay", "clip_value", "clip_norm")


class SpecError(ValueError):
    """What is wrong with a module or an option, and what to do about it."""


def _toml_string(text):
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _number(x):
    if not math.isfinite(float(x)):
        raise SpecError(f"optimizer options must be finite numbers, got {x}")
    return repr(float(x))  # "0.05", "1e-08", "1.0": TOML floats


def sparse_tables(model):
    """{parameter name: module} for every nn.Embedding / nn.EmbeddingBag with sparse=True."""
    import torch.nn as nn

    tables = {}
    for prefix, module in model.named_modules():
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag)) and module.sparse:
            tables[(prefix + "." if prefix else "") + "weight"] = module
    return tables


def _dtype_key(param, where, table):
    """The spec's dtype for a parameter of this torch dtype (None: float32, the default)."""
    import torch

    key = {torch.float32: None, torch.bfloat16: "bf16", torch.float16: "fp16"}.get(param.dtype, "other")
    if key == "other":
        raise SpecError(f"{where} is {str(param.dtype).replace('torch.', '')}; shmps keeps parameters as float32, "
                        f"bfloat16 or float16: convert the module (model.float())")
    return key


def _slice_bytes(requested, table_dims):
    """A slice size that every table's rows divide (a row must not straddle two slices)."""
    if not table_dims:
        return requested
    unit = 64
    for dim in table_dims:
        unit = unit * (4 * dim) // math.gcd(unit, 4 * dim)
    return unit * max(1, -(-requested // unit))


def _table_optimizer_line(table_optimizer):
    """The `optimizer = { ... }` line of every [[table]] from a dict like {"kind": "rowwise_adagrad",
    "lr": 0.1, "eps": 1e-8}: the keys of [optimizer] but state_dtype (the job's)."""
    if not isinstance(table_optimizer, dict):
        raise SpecError(f"table_optimizer must be a dict like {{'kind': 'rowwise_adagrad', 'lr': 0.1}}, "
                        f"got {type(table_optimizer).__name__}")
    options = {k: v for k, v in table_optimizer.items() if v is not None}
    kind = options.pop("kind", "sgd")
    if kind not in TABLE_OPTIMIZER_KEYS:
        raise SpecError(f"table_optimizer kind {kind!r} is not one of the server's: {', '.join(TABLE_OPTIMIZER_KEYS)}")
    if "lr" not in options:
        raise SpecError("table_optimizer needs an lr, e.g. {'kind': 'rowwise_adagrad', 'lr': 0.1}")
    lr = options.pop("lr")
    if not (lr > 0):
        raise SpecError(f"table_optimizer lr must be a positive number, got {lr}")
    allowed = TABLE_OPTIMIZER_KEYS[kind] + _COMMON_KEYS
    for key in options:
        if key == "state_dtype":
            raise SpecError("table_optimizer cannot set state_dtype: the optimizer state has one dtype per job; "
                            "give state_dtype with the job's optimizer options")
        if key not in allowed:
            raise SpecError(f"table_optimizer option {key!r} is not used by {kind!r} (it takes {', '.join(allowed)})")
    items = [f"kind = {_toml_string(kind)}", f"lr = {_number(lr)}"] + [f"{k} = {_number(v)}" for k, v in options.items()]
    return "optimizer = { " + ", ".join(items) + " }", kind


def spec(model, name="model", optimizer="sgd", lr=0.01, consistency="asp", max_workers=16, slice_bytes=65536,
         bsp_aggregate=None, table_optimizer=None, **optimizer_options):
    """The model spec (TOML text) of `model`: see this module's docstring.

    optimizer_options: the server optimizer's keys (momentum, beta1, beta2, rho, eps,
    weight_decay, clip_value, clip_norm, state_dtype); None values are left to the defaults.
    table_optimizer: the sparse embeddings' own optimizer instead of the job's, as a dict of the
    same keys (but state_dtype) with a kind, which may also be "rowwise_adagrad" (one
    accumulator per row): {"kind": "rowwise_adagrad", "lr": 0.1}.
    """
    import torch.nn as nn

    if not isinstance(model, nn.Module):
        raise SpecError(f"spec() takes a torch.nn.Module, got {type(model).__name__}")
    if not _SEGMENT_NAME.match(name) or name.endswith(".lock"):
        raise SpecError(f"the job name {name!r} cannot be a segment name: use 1 to 63 letters, digits, '.', '_' or "
                        f"'-', not starting with '.' or '-' (it names /dev/shm/<name>)")
    if optimizer not in OPTIMIZER_KEYS:
        raise SpecError(f"optimizer {optimizer!r} is not one of the server's: {', '.join(OPTIMIZER_KEYS)}")
    if not (lr > 0):
        raise SpecError(f"lr must be a positive number, got {lr}")
    table_line, table_kind = _table_optimizer_line(table_optimizer) if table_optimizer is not None else (None, None)
    # state_dtype only for the kinds that keep state (plain SGD and row-wise AdaGrad keep no arrays).
    stateful = optimizer != "sgd" or table_kind not in (None, "sgd", "rowwise_adagrad")
    allowed = OPTIMIZER_KEYS[optimizer] + _COMMON_KEYS + (("state_dtype",) if stateful else ())
    given = {k: v for k, v in optimizer_options.items() if v is not None}
    for key in given:
        if key not in allowed:
            raise SpecError(f"optimizer option {key!r} is not used by {optimizer!r} (it takes "
                            f"{', '.join(allowed)})")

    tables = sparse_tables(model)
    params, table_dims = [], []
    for pname, p in model.named_parameters():
        where = f"parameter {pname!r} {tuple(p.shape)}"
        if len(pname.encode()) > _MAX_NAME_BYTES:
            raise SpecError(f"{where}: its name has {len(pname.encode())} bytes, and a shmps name has at most "
                            f"{_MAX_NAME_BYTES}: shorten the module's attribute names")
        if p.dim() > _MAX_DIMS:
            raise SpecError(f"{where}: {p.dim()} dimensions, shmps takes at most {_MAX_DIMS}")
        dtype = _dtype_key(p, where, pname in tables)
        if pname in tables:
            table_dims.append(p.shape[1])
        params.append((pname, p, dtype))
    if not params:
        raise SpecError(f"the module ({type(model).__name__}) has no parameters: there is nothing to serve")
    if table_line is not None and not tables:
        raise SpecError(f"table_optimizer is for sparse embeddings, and the module ({type(model).__name__}) has none: "
                        f"build its nn.Embedding / nn.EmbeddingBag with sparse=True, or leave table_optimizer out")

    lines = [
        f"# The model spec of the module {type(model).__name__}, written by shmps.spec from the module itself:",
        "# every parameter under its named_parameters() name and shape, each with init = \"put\" (rank 0",
        "# puts its freshly initialised module; the others wait for it).",
    ]
    buffers = [b for b, _ in model.named_buffers()]
    if buffers:
        lines.append(f"# Buffers are not served: each worker keeps its own ({', '.join(buffers[:6])}"
                     f"{', ...' if len(buffers) > 6 else ''}).")
    lines += [
        "",
        f"name = {_toml_string(name)}",
        f"slice_bytes = {_slice_bytes(slice_bytes, table_dims)}",
        f"max_workers = {int(max_workers)}",
        f"consistency = {_toml_string(consistency)}",
    ]
    if bsp_aggregate is not None:
        lines.append(f"bsp_aggregate = {_toml_string(bsp_aggregate)}")
    lines += ["", "[optimizer]", f"kind = {_toml_string(optimizer)}", f"lr = {_number(lr)}"]
    for key, value in given.items():
        lines.append(f"{key} = {_toml_string(value) if isinstance(value, str) else _number(value)}")
    for pname, p, dtype in params:
        lines.append("")
        if pname in tables:
            lines += ["[[table]]", f"name = {_toml_string(pname)}", f"rows = {p.shape[0]}", f"dim = {p.shape[1]}"]
            if table_line is not None:
                lines.append(table_line)
        else:
            # A 0-dimensional parameter (a learnt scalar) is served as one element, shape [1].
            shape = list(p.shape) or [1]
            lines += ["[[param]]", f"name = {_toml_string(pname)}", f"shape = [{', '.join(map(str, shape))}]"]
        if dtype is not None:
            lines.append(f'dtype = "{dtype}"  # as the module\'s {str(p.dtype).replace("torch.", "")}: 2 bytes in the segment')
        lines.append('init = "put"')
    return "\n".join(lines) + "\n"


def load_factory(target):
    """The callable named by MODULE:FACTORY (see the module docstring); SpecError if there is none."""
    module_name, sep, factory_name = target.rpartition(":")
    if not sep or not module_name or not factory_name:
        raise SpecError(f"{target!r} is not MODULE:FACTORY: give a module (a dotted name or a .py file) and the "
                        f"function or class in it that returns the nn.Module, e.g. models/net.py:make_model")
    if module_name.endswith(".py") or os.sep in module_name:
        path = os.path.abspath(module_name)
        if not os.path.isfile(path):
            raise SpecError(f"no such file: {module_name} (from {target!r}); give a path to a .py file or an "
                            f"importable module name")
        # Its own folder first on the path, so that the file's sibling imports work as when it runs.
        sys.path.insert(0, os.path.dirname(path))
        stem = os.path.splitext(os.path.basename(path))[0]
        loader_spec = importlib.util.spec_from_file_location(f"shmps_spec_target_{stem}", path)
        module = importlib.util.module_from_spec(loader_spec)
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:  # the user's module failing to import: say so, with its own error
            raise SpecError(f"importing {module_name} failed: {type(e).__name__}: {e}") from e
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            raise SpecError(f"cannot import module {module_name!r}: {e}; give an importable module name (on "
                            f"PYTHONPATH or under the current folder) or a path to a .py file") from e
        except Exception as e:
            raise SpecError(f"importing {module_name} failed: {type(e).__name__}: {e}") from e
    factory = getattr(module, factory_name, None)
    if factory is None:
        callables = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                           and getattr(v, "__module__", None) == module.__name__)
        hint = f"; it defines {', '.join(callables)}" if callables else ""
        raise SpecError(f"module {module_name!r} has no {factory_name!r}{hint}")
    if not callable(factory):
        raise SpecError(f"{target}: {factory_name!r} is a {type(factory).__name__}, not a function or class")
    return factory


def module_from(target):
    """Calls the factory MODULE:FACTORY and checks that it gives an nn.Module."""
    import torch.nn as nn

    factory = load_factory(target)
    try:
        model = factory()
    except Exception as e:
        raise SpecError(f"calling {target}() failed: {type(e).__name__}: {e}; the factory must build the module "
                        f"with no arguments") from e
    if not isinstance(model, nn.Module):
        raise SpecError(f"{target}() returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python3 -m shmps.spec",
                                 description="Write the shmps model spec of a PyTorch module to stdout.")
    ap.add_argument("target", metavar="MODULE:FACTORY",
                    help="a module (dotted name or .py file) and the function or class in it returning the nn.Module")
    ap.add_argument("--name", help="the job's (segment's) name; default: the factory's name in lower case")
    ap.add_argument("--optimizer", default="sgd", choices=sorted(OPTIMIZER_KEYS), help="the server's optimizer")
    ap.add_argument("--lr", type=float, default=0.01, help="learning rate (default 0.01)")
    for key in ("momentum", "beta1", "beta2", "rho", "eps", "weight_decay", "clip_value", "clip_norm"):
        ap.add_argument("--" + key.replace("_", "-"), dest=key, type=float, help=f"the optimizer's {key}")
    ap.add_argument("--state-dtype", choices=["f32", "bf16"], help="the optimizer state's type")
    ap.add_argument("--table-optimizer", choices=sorted(TABLE_OPTIMIZER_KEYS),
                    help="the sparse embeddings' own optimizer (default: the job's); rowwise_adagrad keeps one "
                         "accumulator per row")
    ap.add_argument("--table-lr", type=float, help="the learning rate of --table-optimizer (required with it)")
    ap.add_argument("--consistency", default="asp", help='"asp" (default), "bsp" or "ssp:N"')
    ap.add_argument("--bsp-aggregate", choices=["sum", "mean"], help="BSP: sum (default) or mean of a step's gradients")
    ap.add_argument("--max-workers", type=int, default=16, help="worker slots (default 16)")
    ap.add_argument("--slice-bytes", type=int, default=65536, help="bytes per slice (default 65536)")
    args = ap.parse_args(argv)
    try:
        model = module_from(args.target)
        name = args.name or re.sub(r"[^A-Za-z0-9._-]", "_", args.target.rpartition(":")[2].lower())
        options = {k: getattr(args, k) for k in ("momentum", "beta1", "beta2", "rho", "eps", "weight_decay",
                                                 "clip_value", "clip_norm", "state_dtype")}
        if args.table_lr is not None and args.table_optimizer is None:
            raise SpecError("--table-lr is the learning rate of --table-optimizer: give --table-optimizer too")
        table = None
        if args.table_optimizer is not None:
            table = {"kind": args.table_optimizer, "lr": args.table_lr}
        text = spec(model, name=name, optimizer=args.optimizer, lr=args.lr, consistency=args.consistency,
                    max_workers=args.max_workers, slice_bytes=args.slice_bytes, bsp_aggregate=args.bsp_aggregate,
                    table_optimizer=table, **options)
    except SpecError as e:
        print(f"shmps.spec: error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
