"""One conversion's inputs and notes, and the shaping of `trt_patch` entries that both zoo styles share.

:class:`Converter` holds the bundle's inference config, the zoo file, the converter options, the notes (`mapped`,
`unmapped`) and the entries made so far; the style modules (:mod:`.trt_compile`, :mod:`.torch_tensorrt`) fill it,
:mod:`.assemble` turns it into the patch.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai_trt.bundle.zoo.checks import accepted_build_args
from monai_trt.bundle.zoo.configs import MISSING, ConversionError, load_config, lookup
from monai_trt.bundle.zoo.expressions import alias_group, same_object_parent
from monai_trt.patch.spec import METHODS, PRECISIONS


class Converter:
    """The state of one conversion.

    Attributes:
        root: the bundle directory.
        inference_path: the bundle's inference config; `inference` its raw content.
        trt_path: the zoo TensorRT config; `trt` its raw content.
        readme: where the `trt_export` command may be documented (None: no README).
        method: `keep` (the zoo's own) or the method of every entry.
        precision: None (the zoo's own) or the precision of every entry.
        keep: zoo keys to carry over verbatim.
        aux: the inference config plus the plain ids only the zoo file defines (e.g. vista3d's `network_dev`), where
            the module a `trt_compile` call wraps is looked up.
        literals: the ids a condition of the zoo file sees (the zoo file over the inference config).
        mapped: notes on what was carried over and how.
        unmapped: notes on what the patch does not carry, and why.
        targets: patched network id -> its entries, in the order made.
        consumed: zoo keys that were mapped.
    """

    def __init__(self, root: Path, inference_path: Path, trt_path: Path, readme: Path | None, method: str,
                 precision: str | None, keep: Sequence[str]) -> None:
        self.root, self.inference_path, self.trt_path, self.readme = root, inference_path, trt_path, readme
        self.method, self.precision, self.keep = method, precision, tuple(keep)
        self.inference = load_config(inference_path)
        self.trt = load_config(trt_path)
        extra = {k: v for k, v in self.trt.items() if k not in self.inference and "#" not in k and "::" not in k}
        self.aux = {**extra, **self.inference}
        self.literals = {**self.inference, **self.trt}
        self.mapped: list[str] = []
        self.unmapped: list[str] = []
        self.targets: dict[str, list[dict[str, Any]]] = {}
        self.consumed: set[str] = set()

    def evaluator_network(self) -> str | None:
        """The id the inference config's `evaluator` uses as its network, if any."""
        evaluator = self.inference.get("evaluator")
        return same_object_parent(evaluator.get("network")) if isinstance(evaluator, Mapping) else None

    def set_precision(self, entry: dict[str, Any], key: str, zoo: Any, source: str, default: str | None) -> None:
        """Set the entry's precision: the converter option, else the zoo's (`zoo`, from `source`), else `default`.

        Raises:
            ConversionError: the zoo's precision is not one monai_trt has.
        """
        if self.precision is not None:
            entry["precision"] = self.precision
            self.mapped.append(f"'{key}': precision {self.precision} (converter option; zoo: {zoo or default})")
            return
        if isinstance(zoo, str) and zoo.lower() in PRECISIONS:
            entry["precision"] = zoo.lower()
            self.mapped.append(f"'{key}': precision {zoo.lower()} from {source}")
        elif isinstance(zoo, str) and zoo.startswith("$"):
            entry["precision"] = zoo
            self.mapped.append(f"'{key}': precision {zoo} (expression, resolved at run time)")
        elif zoo is None and default is not None:
            entry["precision"] = default
            self.mapped.append(f"'{key}': precision {default} ({source})")
        elif zoo is not None and not (isinstance(zoo, str) and zoo.startswith("<")):
            raise ConversionError(f"'{key}': precision {zoo!r} ({source}) is not one of {list(PRECISIONS)}")
        else:
            entry["precision"] = "fp16"
            given = f"{source} is {zoo!r}" if zoo is not None else "no trt_export command documented"
            self.unmapped.append(f"'{key}': precision not fixed by the zoo ({given}); fp16 chosen, pass "
                                 "precision='fp32' to the converter for fp32")

    def set_method(self, entry: dict[str, Any], key: str, zoo: str, source: str) -> None:
        """Set the entry's method: the converter option, else the zoo's (`zoo`, from `source`).

        Raises:
            ConversionError: the zoo's method is not one monai_trt has.
        """
        if self.method != "keep":
            entry["method"] = self.method
            self.mapped.append(f"'{key}': method {self.method} (converter option; zoo: {zoo} from {source})")
            return
        if zoo not in METHODS:
            raise ConversionError(f"'{key}': zoo method {zoo!r} is not one of {list(METHODS)}")
        entry["method"] = zoo
        self.mapped.append(f"'{key}': method {zoo} from {source} (where it is not available, the entry warns once "
                           "and runs PyTorch; convert with method='auto' to use the best engine of each machine)")

    def add_entry(self, network: str, key: str, entry: dict[str, Any], what: str) -> None:
        """Add an entry (method set) made from zoo key `key` to the section of `network`; `what` is its note."""
        self._filter_build_args(entry, key)
        self._dynamic_batch(network, entry)
        if network not in self.targets:
            self._training_mode(network)
        self._autoencoder(network, entry)
        self.targets.setdefault(network, []).append(entry)
        self.mapped.append(what)

    def _filter_build_args(self, entry: dict[str, Any], key: str) -> None:
        """Drop build_args the entry's method does not take (e.g. TensorRT options after --method onnxruntime)."""
        build_args = entry.get("build_args")
        if not isinstance(build_args, Mapping):
            return
        unknown = sorted(set(build_args) - accepted_build_args(entry["method"]))
        if unknown:
            self.unmapped.append(f"'{key}': build_args {unknown} are not options of method {entry['method']}; "
                                 "dropped")
            build_args = entry["build_args"] = {k: v for k, v in build_args.items() if k not in unknown}
        if not build_args:
            del entry["build_args"]

    def _dynamic_batch(self, network: str, entry: dict[str, Any]) -> None:
        """A whole network run by the evaluator's sliding window gets a batch range up to its `sw_batch_size`."""
        if entry.get("dynamic_batchsize") is not None or entry.get("input_profiles") or entry.get("submodule"):
            return
        evaluator = self.inference.get("evaluator")
        if not isinstance(evaluator, Mapping) or self.evaluator_network() not in alias_group(self.inference, network):
            return
        inferer = same_object_parent(evaluator.get("inferer"))
        config = lookup(self.inference, inferer) if inferer else MISSING
        if isinstance(config, Mapping) and "sw_batch_size" in config:
            ref = f"@{inferer.replace('::', '#')}#sw_batch_size"
            entry["dynamic_batchsize"] = f"$[1, {ref}, {ref}]"
            self.mapped.append(f"@{network}: dynamic_batchsize [1, sw_batch_size, sw_batch_size] from the sliding "
                               "window inferer (its last window batch may be smaller; one engine serves all)")

    def _training_mode(self, network: str) -> None:
        """Note a network the bundle never puts in eval mode: no engine serves it."""
        group = alias_group(self.inference, network)
        if self.evaluator_network() in group:
            return  # MONAI evaluators put the network in eval mode
        text = json.dumps(self.inference).replace("#", "::")
        if any(re.search(rf"@{re.escape(g)}(?:\.\w+\([^()]*\))*\.eval\(\)", text) for g in group):
            return
        self.unmapped.append(
            f"@{network} is never put in eval mode by the bundle (no evaluator, no .eval()); monai_trt serves it only "
            "while no gradient is needed and no layer behaves differently in training (else PyTorch, one warning)"
        )

    def _autoencoder(self, network: str, entry: dict[str, Any]) -> None:
        """Note a whole autoencoder patched: samplers call its decode(), which a forward() entry does not serve."""
        if entry.get("submodule"):
            return
        for alias in alias_group(self.inference, network):
            target = lookup(self.inference, f"{alias}::_target_")
            if isinstance(target, str) and ("Autoencoder" in target or "VQVAE" in target):
                self.unmapped.append(
                    f"@{network} ({target.split('.')[-1]}) is patched as a whole, as in the zoo file; latent "
                    "diffusion samplers call its decode()/decode_stage_2_outputs(), not forward(), so that entry "
                    "serves nothing: use submodule 'decoder' to accelerate decoding"
                )
                return
