"""``make demo``: the quickstart on random-weight torchvision models, printed."""

from __future__ import annotations

import time

import torch
import torchvision

import fxstore


def main() -> None:
    """Run the quickstart: select layers, compare with the plain model, compile, store."""
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval()
    x = torch.rand(2, 3, 224, 224)
    names = fxstore.node_names(model)
    print(f"resnet50: {len(names)} selectable nodes, e.g. {names[:3]} ... {names[-3:]}")

    start = time.perf_counter()
    ex = fxstore.FeatureExtractor(model, ["layer1", model.layer4, "layer3.5.relu_2", "flatten"])
    print(f"trace + rewrite: {1e3 * (time.perf_counter() - start):.0f} ms")
    with torch.no_grad():
        out, feats = ex(x)
        same = torch.equal(out, model(x))
    for key, value in feats.items():
        print(f"  {key:18s} {tuple(value.shape)}")
    print(f"output bit-equal to model(x): {same}")

    compiled = torch.compile(ex, backend="aot_eager", fullgraph=True)
    explanation = torch._dynamo.explain(ex)(x)
    with torch.no_grad():
        cout, cfeats = compiled(x)
    print(f"torch.compile(fullgraph=True): {explanation.graph_break_count} graph breaks, "
          f"features equal: {all(torch.equal(cfeats[k], feats[k]) for k in feats)}")

    vgg = torchvision.models.vgg19(weights=None).eval()
    storage = fxstore.ForwardModuleStorage(vgg, {"style": [vgg.features[5]], "content": [vgg.features[5], vgg.features[10]]})
    storage(torch.rand(1, 3, 224, 224), "style")
    storage(torch.rand(1, 3, 224, 224), "content")
    print("vgg19 groups:", {g: {k: tuple(v.shape) for k, v in storage[g].items()} for g in ("style", "content")})
    grads = fxstore.BackwardModuleStorage(vgg, [vgg.features[3]])
    loss = torch.nn.functional.cross_entropy(grads(torch.rand(1, 3, 224, 224)), torch.tensor([1]))
    loss.backward()
    print("vgg19 gradient w.r.t. features[3] output:", tuple(grads[vgg.features[3]][0].shape))


if __name__ == "__main__":
    main()
