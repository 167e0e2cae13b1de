"""Where a module runs and where its weights are, for models dispatched by accelerate.

A model loaded with ``model.device: auto`` (``device_map="auto"``), or dispatched by hand with
``accelerate.dispatch_model``, may be spread over several GPUs, the CPU and the disk. Each
decoder layer then runs on its own *execution device*, and the weights of an *offloaded*
module (kept in CPU memory or on disk) sit on the ``meta`` device outside its forward: an
accelerate hook (``module._hf_hook``) brings them in before the forward and drops them after.
Code that reads weights outside a forward (a metric's ``prepare``, slicing, a compensator) or
that runs a layer without calling its ``forward`` (the dynamic runtime) uses these helpers:

* :func:`execution_device`: where a module's computation happens (and where tensors that
  meet its activations belong, e.g. a per-layer statistic);
* :func:`onloaded`: a context in which the module's real weights are available;
* :func:`input_device`: where a model's input ids go;
* :func:`is_offloaded`, :func:`stored_tensor` (an offloaded weight read from its store);
* :func:`restored`: for code that rebuilds a module (static slicing), which stores the new
  module again where the old one was; :func:`new_offload_folder` is where disk copies go.

On a model that is not dispatched they cost nothing: :func:`onloaded` does nothing and
:func:`execution_device` is the parameters' device. accelerate is imported only when a
module carries one of its hooks.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from prunekit._files import cache_root

__all__ = [
    "execution_device",
    "input_device",
    "is_offloaded",
    "new_offload_folder",
    "onloaded",
    "restored",
    "stored_tensor",
]


def _align_hooks(module: nn.Module) -> list:
    """The ``AlignDevicesHook`` objects attached to ``module`` itself (also inside a
    ``SequentialHook``)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    from accelerate.hooks import AlignDevicesHook

    hooks = getattr(hook, "hooks", None) or [hook]  # a SequentialHook holds several
    return [h for h in hooks if isinstance(h, AlignDevicesHook)]


def _offload_hooks(module: nn.Module) -> list[tuple[nn.Module, object]]:
    """``(submodule, hook)`` for every hook in ``module``'s tree that offloads weights."""
    return [(m, h) for m in module.modules() for h in _align_hooks(m) if h.offload]


def is_offloaded(module: nn.Module) -> bool:
    """Whether some weights of ``module`` (or of its submodules) are offloaded by accelerate,
    that is: held in CPU memory or on disk and on the ``meta`` device outside a forward."""
    return bool(_offload_hooks(module))


def execution_device(module: nn.Module) -> torch.device:
    """The device ``module`` computes on.

    For a dispatched module: the execution device of the first accelerate hook in its tree
    (the module's own, then its submodules'). Otherwise the device of its first parameter or
    buffer; CPU for a module without tensors.

    :raises ValueError: when every weight is on the ``meta`` device and no hook says where the
        module runs (pass the module that holds the hook, such as the decoder layer).
    """
    for m in module.modules():
        for hook in _align_hooks(m):
            if hook.execution_device is not None:
                return torch.device(hook.execution_device)
    tensors = [*module.parameters(), *module.buffers()]
    for t in tensors:
        if not t.is_meta:
            return t.device
    if tensors:
        raise ValueError(
            f"{type(module).__name__}: every weight is on the meta device and no "
            "accelerate hook says where it runs; ask its decoder layer (or the "
            "module that holds the hook) instead"
        )
    return torch.device("cpu")


def input_device(model: nn.Module) -> torch.device:
    """Where ``model``'s input ids belong: the execution device of its input embeddings (the
    device of its first parameter on a model that is not dispatched)."""
    get = getattr(model, "get_input_embeddings", None)
    embeddings = get() if callable(get) else None
    return execution_device(embeddings if embeddings is not None else model)


@contextlib.contextmanager
def onloaded(module: nn.Module) -> Iterator[nn.Module]:
    """Within the context, every offloaded weight of ``module`` and its submodules is real and
    on its execution device; they are offloaded again on exit. A no-op for a module that is not
    dispatched.

    Forwards of submodules inside the context keep the weights in place (their hooks only move
    inputs), so code may mix direct weight reads and module calls. Pass a whole decoder layer
    (``LayerAdapter.module``) rather than one projection: accelerate may hold a projection's
    weights in a hook of an enclosing module.

    :raises RuntimeError: when weights of ``module`` remain on the ``meta`` device, naming one.
    """
    pending = _offload_hooks(module)
    loaded: list[tuple[nn.Module, object]] = []
    try:
        for m, hook in pending:
            hook.pre_forward(m)
            loaded.append((m, hook))
        for _, hook in pending:  # nested forwards must not drop the weights
            hook.offload = False
        left = next((name for name, p in module.named_parameters() if p.is_meta), None)
        if left is not None:
            raise RuntimeError(
                f"{type(module).__name__}: {left} is on the meta device and no accelerate hook "
                "of this module stores it (it is offloaded by a hook of an enclosing module); "
                "onload that module instead, e.g. the decoder layer (LayerAdapter.module)"
            )
        yield module
    finally:
        for _, hook in pending:
            hook.offload = True
        for m, hook in reversed(loaded):
            hook.post_forward(m, None)


def stored_tensor(model: nn.Module, name: str) -> torch.Tensor:
    """The value of parameter or buffer ``name`` (a dotted name in ``model``): the tensor
    itself, or, when accelerate offloaded it (``meta`` device), its stored copy (read from
    CPU memory or from disk, one tensor at a time).

    :raises KeyError: when ``name`` is offloaded and no hook of ``model`` stores it.
    """
    module_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(module_name)
    tensor = getattr(owner, leaf)
    if not tensor.is_meta:
        return tensor
    parts = name.split(".")
    for i in range(len(parts) - 1, -1, -1):  # the innermost hook first
        holder = model.get_submodule(".".join(parts[:i]))
        for hook in _align_hooks(holder):
            if hook.offload and hook.weights_map is not None:
                with contextlib.suppress(KeyError):
                    return hook.weights_map[".".join(parts[i:])]
    raise KeyError(f"{name} is on the meta device, but no accelerate hook of the model stores it")


def _stored_on_disk(module: nn.Module, hook) -> bool:
    """Whether ``hook`` (attached to ``module``) reads its weights from disk."""
    from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset

    store, prefix = hook.weights_map, ""
    if isinstance(store, PrefixedDataset):
        store, prefix = store.dataset, store.prefix
    if not isinstance(store, OffloadedWeightsLoader):
        return False
    names = [n for n, _ in module.named_parameters(recurse=hook.place_submodules)]
    return any(prefix + n in store.index and prefix + n not in store.state_dict for n in names)


@contextlib.contextmanager
def restored(module: nn.Module) -> Iterator[nn.Module]:
    """For code that rebuilds ``module`` (static slicing replaces its projections by smaller
    ones): within the context its weights are real, as with :func:`onloaded`; on a normal exit
    an offloaded module is stored again the way it was, now as a whole, with its new
    submodules.

    * weights that were on disk go to a new folder (:func:`new_offload_folder`), read back
      for each forward;
    * weights held in CPU memory for a GPU stay in CPU memory, copied to the GPU for each
      forward.

    In both cases one hook on ``module`` onloads all its weights before its forward (so its
    new submodules may read each other's weights) and drops them after. A module that is not
    offloaded is left as the code in the context made it (new weights where the code put them,
    by default on the execution device).
    """
    pending = _offload_hooks(module)
    if not pending:
        yield module
        return
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module
    from accelerate.utils import (
        OffloadedWeightsLoader,
        offload_state_dict,
        set_module_tensor_to_device,
    )

    device = execution_device(module)
    on_disk = any(_stored_on_disk(m, hook) for m, hook in pending)
    previous = {str(getattr(hook.weights_map, "save_folder", None)) for _, hook in pending}
    own = next(iter(_align_hooks(module)), None)
    with onloaded(module):
        yield module
        weights = {name: p.detach().to("cpu") for name, p in module.named_parameters()}
        buffers = dict(module.named_buffers())
    remove_hook_from_module(module, recurse=True)
    for name, buffer in buffers.items():  # buffers stay on the device (offload_buffers=False)
        if module.get_buffer(name).is_meta:
            set_module_tensor_to_device(module, name, device, value=buffer)
    if on_disk:
        folder = new_offload_folder(module)
        _RESTORED.add(str(folder))
        offload_state_dict(folder, weights)
        weights = OffloadedWeightsLoader(save_folder=str(folder))
    hook = AlignDevicesHook(
        execution_device=device,
        offload=True,
        weights_map=weights,
        place_submodules=True,
        io_same_device=bool(own is not None and own.io_same_device),
        skip_keys=own.skip_keys if own is not None else None,
    )
    add_hook_to_module(module, hook)
    for folder in previous & _RESTORED:  # an earlier restore's folder, now replaced
        _RESTORED.discard(folder)
        shutil.rmtree(folder, ignore_errors=True)


def new_offload_folder(owner: object | None = None) -> Path:
    """A new folder for offloaded weights under ``<prunekit cache>/offload/``, deleted when
    ``owner`` is garbage-collected, and in any case when the process exits. Folders left by
    processes of this machine that no longer run (killed before they could clean up) are
    deleted first."""
    root = cache_root() / "offload"
    root.mkdir(parents=True, exist_ok=True)
    host = socket.gethostname()
    for stale in root.glob(f"{host}-*-*"):
        pid = stale.name[len(host) + 1 :].partition("-")[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{host}-{os.getpid()}-", dir=root))
    weakref.finalize(
        owner if owner is not None else _PROCESS, shutil.rmtree, folder, ignore_errors=True
    )
    return folder


class _Process:
    """Lives as long as the process: what a folder without an owner belongs to."""


_PROCESS = _Process()
#: the folders :func:`restored` wrote, each holding one module's weights only
_RESTORED: set[str] = set()


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True
