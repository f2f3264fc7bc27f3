import json
import re

import pytest

from prunekit import spec as S
from prunekit.models import ZOO, zoo_spec


@pytest.mark.parametrize("name", ZOO + ("imagenet-preresnet101",))
def test_json_round_trip_is_exact(name):
    spec = zoo_spec(name)
    assert S.from_dict(json.loads(S.to_json(spec))) == spec


def test_a_block_records_its_pad_index_only_where_compression_set_one():
    import dataclasses

    spec = zoo_spec("resnet20", shortcut="pad")
    assert "pad_index" not in S.to_json(spec)
    stages = [list(stage) for stage in spec.stages]
    stages[1][0] = dataclasses.replace(stages[1][0], pad_index=[2, 0, 1] + list(range(3, 16)))
    moved = dataclasses.replace(spec, stages=stages)
    assert S.to_json(moved).count('"pad_index"') == 1
    assert S.from_dict(json.loads(S.to_json(moved))) == moved


def test_units_form_gives_the_papers_depths():
    r50 = zoo_spec("resnet50", num_classes=1000)
    r41 = S.apply_units(r50, [(0, False), (4, True), (6, True), (3, True)])
    r32 = S.apply_units(r50, [(1, False), (4, True), (4, True), (1, True)])
    r26 = S.apply_units(r50, [(0, False), (2, False), (5, False), (1, True)])
    assert [S.count_layers(s) for s in (r41, r32, r26)] == [41, 32, 26]
    first = r41.stages[0][0]
    assert (first.inner, first.shortcut, first.out) == ([], "conv", 256)
    assert len(r41.stages[0]) == 1 and len(r41.stages[1]) == 4
    assert [len(s) for s in r26.stages] == [1, 3, 6, 1]


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["stages"][0][0].update(out=-3), "spec.stages[0][0].out"),
    (lambda d: d["stages"][0][0].update(inner=[0]), "spec.stages[0][0].inner[0]"),
    (lambda d: d["stages"][1][0].update(inner=[10 ** 9]), "spec.stages[1][0].inner[0]"),
    (lambda d: d.update(block="weird"), "spec.block"),
    (lambda d: d.update(stem="16"), "spec.stem"),
    (lambda d: d["stages"][0][0].update(shortcut="magic"), "spec.stages[0][0].shortcut"),
    (lambda d: d["stages"][0][1].update(out=17), "spec.stages[0][1].shortcut"),
    (lambda d: d.update(colour=1), "spec: unknown field 'colour'"),
])
def test_malformed_specs_name_the_field(mutate, field):
    data = S.to_dict(zoo_spec("resnet20"))
    mutate(data)
    with pytest.raises(S.SpecError, match=field.replace("[", r"\[").replace("]", r"\]")):
        S.from_dict(data)


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d["stages"][0][0].update(inner=[16]), "spec.stages[0][0].inner: a block without expansion has its "
                                                     "input's width (32)"),
    (lambda d: d["stages"][1][0].update(shortcut="identity"), "spec.stages[1][0].shortcut: an identity shortcut"),
    (lambda d: d["stages"][1][1].update(shortcut="conv"), "spec.stages[1][1].shortcut: must be 'identity' or 'none'"),
    (lambda d: d["stages"][1][1].update(inner=[96, 96]), "spec.stages[1][1].inner: an inverted-residual block has 1"),
    (lambda d: d.update(stem_stride=4), "spec.stem_stride"),
    (lambda d: d.update(dropout=1.0), "spec.dropout"),
    (lambda d: d.pop("head"), "spec.head: required"),
])
def test_malformed_mobilenet_specs_name_the_field(mutate, field):
    data = S.to_dict(zoo_spec("mobilenet_v2_cifar"))
    mutate(data)
    with pytest.raises(S.SpecError, match=re.escape(field)):
        S.from_dict(data)


def test_mobilenet_spec_lists_its_blocks_and_layers():
    spec = zoo_spec("mobilenet_v2", num_classes=1000)
    assert S.count_layers(spec) == 53  # stem, 2 + 16 × 3 block convs, head conv, classifier
    assert S.feature_width(spec) == 1280
    assert [row["blocks"] for row in S.stage_table(spec)] == [1, 2, 3, 4, 3, 3, 1]
    assert spec.stages[1][1] == S.InvertedResidualSpec([144], 24, 1, "identity")


def test_spec_file_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(S.SpecError, match="bad.json"):
        S.load(path)


def test_stage_with_no_blocks_left_is_valid():
    spec = zoo_spec("resnet20")
    spec.stages[0] = []
    S.validate(spec)


@pytest.mark.parametrize("name, size, message", [
    ("vgg16", 28, "spec.layers[12].pool: a 2×2 pool leaves nothing of its 1×1 input"),  # 28 14 7 3 1 → 0
    ("cnn4", 8, "spec.layers[3].kernel: a 4×4 kernel does not fit its 1×1 input with padding 0"),  # 8 4 2 1
])
def test_a_convnet_too_deep_for_its_images_is_refused(name, size, message):
    with pytest.raises(S.SpecError, match=message.replace("[", r"\[").replace("]", r"\]")):
        S.check_input_size(zoo_spec(name), size)


@pytest.mark.parametrize("layers", [
    [S.ConvLayerSpec(2, 5, pool="max3s2"), S.ConvLayerSpec(2, 5, pool="max3s2"), S.ConvLayerSpec(2, 3, pool="max3s2"),
     S.ConvLayerSpec(2, 4, padding=0)],  # cnn4's layout, narrow
    [S.ConvLayerSpec(2, pool="max2")] * 3 + [S.ConvLayerSpec(2, 7, padding=1, pool="max2")],
])
def test_the_sizes_accepted_are_those_the_network_can_run(layers):
    import torch
    from prunekit.models import build

    model = build(S.ConvNetSpec(layers, in_channels=1)).eval()
    for size in range(1, 41):
        try:
            S.check_input_size(model.spec, size)
            accepted = True
        except S.SpecError:
            accepted = False
        try:
            model(torch.zeros(1, 1, size, size))
            runs = True
        except RuntimeError:
            runs = False
        assert accepted == runs, size
