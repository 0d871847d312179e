"""Reading features back: by key, by the layer they were selected with, gradients and attributions;
and reading what the capture did to the graph (:attr:`Readout.graph_description`).

:class:`Readout` is the part of :class:`~.extractor.FeatureExtractor` that reads a call's
``features`` dict; it needs only the current mode's program (``_program()``), the wrapped
model and the storage policy, which the extractor provides.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, LayerNotFoundError
from . import _taps
from ._describe import GraphDescription
from ._policy import StoragePolicy
from ._program import Program
from ._selection import spec_label

__all__ = ["Readout"]


class Readout:
    """Features by key, by layer, and the gradients of the tapped layers (a mixin of the extractor)."""

    wrapped_model: nn.Module

    def _program(self) -> Program:
        raise NotImplementedError

    def _policy(self) -> StoragePolicy:
        raise NotImplementedError

    @property
    def graph_description(self) -> GraphDescription:
        """The current mode's traced graph and what the capture did to each node, as plain data.

        Stored nodes carry their feature keys, tapped nodes their gradient keys, edited nodes
        their edit's type, and nodes cut by ``keep_output=False`` are marked ``pruned``
        (``ex.draw()`` draws it). An export-frontend extractor has one after its first call
        (or with ``example_inputs``).

        Example:
            >>> import torchvision, fxstore
            >>> m = torchvision.models.resnet18()
            >>> ex = fxstore.FeatureExtractor(m, ["layer1"], edits={"layer2": fxstore.Scale(0.5)})
            >>> [(n.name, n.keys, n.edit) for n in ex.graph_description.nodes if n.selected]
            [('layer1.1.relu_1', ('layer1',), None), ('layer2.1.relu_1', (), 'Scale')]
        """
        description = self._program().description
        if description is None:  # every frontend describes its program; a hand-made one may not
            raise ConfigError("this extractor's program has no graph description.\n"
                              "Hint: build it with fxstore.FeatureExtractor.")
        return description

    @property
    def feature_keys(self) -> tuple[str, ...]:
        """Keys of the stored features in the current mode, in order."""
        return self._program().keys

    def keys_for(self, layer: Any) -> tuple[str, ...]:
        """Feature keys a layer (module object, name or alias) was stored under.

        Example:
            >>> import torchvision, fxstore
            >>> m = torchvision.models.resnet18()
            >>> fxstore.FeatureExtractor(m, [m.relu, "layer1"]).keys_for(m.relu)
            ('relu',)
        """
        program = self._program()
        label = layer
        if isinstance(layer, nn.Module):
            names = [n for n, m in self.wrapped_model.named_modules() if m is layer]
            label = names[0] if names else layer
        keys = program.keys_of(label if isinstance(label, str) else spec_label(label))
        if keys is None:
            raise LayerNotFoundError(
                f"layer {layer!r} was not selected by this extractor (keys: {list(program.keys)}).\n"
                "Hint: read features by key, module object or the name you selected it with."
            )
        return keys

    def by_label(self, features: Mapping[str, Any], grads: bool = False) -> dict[str, list[Any]]:
        """Features (or gradient tickets, ``grads=True``) by the label each layer was selected with.

        Every value a label stored, in call order: one per call of a module, repeated runs of
        partially traced parts and the outputs of tuple-valued layers included.

        Example:
            >>> import torch, torchvision, fxstore
            >>> m = torchvision.models.resnet18()
            >>> ex = fxstore.FeatureExtractor(m, ["layer1", "layer2.*.relu"], keep_output=False)
            >>> {k: len(v) for k, v in ex.by_label(ex(torch.rand(1, 3, 32, 32))[1]).items()}
            {'layer1': 1, 'layer2.*.relu': 2}
        """
        return self._program().by_label(features, grads)

    @staticmethod
    def gradients(features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Gradients of the tapped layers, read after ``backward()``.

        Args:
            features: The features dict returned by the call.

        Returns:
            ``{key: d(loss)/d(layer output)}`` for each tapped layer.

        Raises:
            GradientNotReadyError: if backward has not reached a tapped layer yet.

        Example:
            >>> import torch, torchvision, fxstore
            >>> m = torchvision.models.resnet18()
            >>> ex = fxstore.FeatureExtractor(m, grads=["layer4"])
            >>> out, feats = ex(torch.rand(1, 3, 64, 64))
            >>> out.sum().backward()
            >>> tuple(ex.gradients(feats)["layer4"].shape)
            (1, 512, 2, 2)
        """
        return _taps.gradients(features)

    def attributions(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Activation × gradient of every tapped layer, read after ``backward()``.

        The first-order attribution of Captum's ``LayerGradientXActivation`` and of
        attribution patching: ``value * d(loss)/d(value)``, elementwise, without autograd
        history. The activation is the stored feature of the same layer, so select the
        tapped layers in ``layers=`` too (as in the example).

        Raises:
            GradientNotReadyError: if backward has not reached a tapped layer yet.
            ConfigError: a tapped layer is not stored, or stored through a ``transform``.

        Example:
            >>> import torch, torchvision, fxstore
            >>> m = torchvision.models.resnet18()
            >>> ex = fxstore.FeatureExtractor(m, ["layer3"], grads=["layer3"])
            >>> out, feats = ex(torch.rand(1, 3, 64, 64))
            >>> out[:, 0].sum().backward()
            >>> attr = ex.attributions(feats)["layer3"]
            >>> torch.equal(attr, feats["layer3"].detach() * ex.gradients(feats)["layer3"])
            True
        """
        if self._policy().transform is not None:
            raise ConfigError(
                "attributions need the layers' own values, and this extractor stores them through transform=.\n"
                "Hint: build the extractor without transform= (or use gradients() and your own activations)."
            )
        return _taps.attributions(features)

