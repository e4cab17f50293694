"""Tests of wrn_det.models: sizes, equivalence with torchvision, errors, feature protocol, checkpointing."""
import copy
import math

import pytest
import torch
import torchvision
from torch import nn

from wrn_det.models import ShapeSpec, build_model, count_parameters, list_models


# ---------------------------------------------------------------- sizes ----

@pytest.mark.parametrize("name,num_classes,expected", [
    ("nin", 10, 1_007_242),
    ("vgg_cifar", 10, 20_035_018),
    ("wrn_28_10", 10, 36_479_194),
    ("wrn_28_10", 100, 36_536_884),
    ("wrn_40_4", 10, 8_949_210),
    ("wrn_16_8", 10, 10_961_370),
    ("wide_resnet50_2", 1000, 68_883_240),
    ("wide_resnet34_2", 1000, 86_036_008),
])
def test_exact_parameter_counts(name, num_classes, expected):
    with torch.device("meta"):  # shapes only: no memory, no initialisation time
        model = build_model(name, num_classes=num_classes)
    assert count_parameters(model) == expected


@pytest.mark.parametrize("name,millions", [("preact_resnet164", 1.7), ("preact_resnet1001", 10.2)])
def test_preact_baselines_have_the_papers_size(name, millions):
    with torch.device("meta"):
        params = count_parameters(build_model(name, num_classes=10))
    assert abs(params / 1e6 - millions) / millions < 0.02


def test_default_num_classes_follow_the_family():
    assert build_model("wrn_16_1").fc.out_features == 10
    assert build_model("nin")(torch.zeros(1, 3, 32, 32)).shape == (1, 10)
    assert build_model("wide_resnet18_1").fc.out_features == 1000


def test_list_models_builds_and_has_the_paper_rows():
    names = list_models()
    for name in ("wrn_28_10", "wrn_40_4", "wrn_16_8", "wrn_52_1", "wide_resnet50_2", "wide_resnet34_2",
                 "preact_resnet164", "preact_resnet1001", "nin", "vgg_cifar"):
        assert name in names
    # Every listed name is accepted (building on the meta device skips the allocation).
    with torch.device("meta"):
        for name in names:
            build_model(name)


# ------------------------------------------------------------- torchvision ----

def _randomize_bn_stats(model):
    # Fresh BN layers have mean 0 / var 1 and weight 1, which would hide a
    # swapped or missing BN; random values make the comparison meaningful.
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)


def test_wide_resnet50_2_loads_torchvision_weights_and_matches_logits():
    torch.manual_seed(0)
    ref = torchvision.models.wide_resnet50_2()
    _randomize_bn_stats(ref)
    ref.eval()
    ours = build_model("wide_resnet50_2")
    ours.load_state_dict(ref.state_dict(), strict=True)
    ours.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        diff = (ours(x) - ref(x)).abs().max().item()
    assert diff < 1e-4


def test_wide_resnet18_1_is_torchvision_resnet18():
    torch.manual_seed(0)
    ref = torchvision.models.resnet18(num_classes=10)
    _randomize_bn_stats(ref)
    ours = build_model("wide_resnet18_1", num_classes=10)
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert (ours.eval()(x) - ref.eval()(x)).abs().max().item() < 1e-4


def test_basic_block_wide_resnet_uses_torchvision_keys():
    with torch.device("meta"):
        ours = build_model("wide_resnet34_2", num_classes=1000).state_dict()
        ref = torchvision.models.resnet34().state_dict()
    # Widening makes the first block 64 -> 128, which needs a projection that
    # ResNet-34 does not have; every other key is torchvision's.
    extra = [k for k in ours if k not in ref]
    assert extra == [f"layer1.0.downsample.{k}" for k in
                     ("0.weight", "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked")]
    assert [k for k in ours if k in ref] == list(ref)
    assert ours["layer1.0.conv1.weight"].shape == (128, 64, 3, 3)
    assert ours["layer4.2.conv2.weight"].shape == (1024, 1024, 3, 3)
    assert ours["fc.weight"].shape == (1000, 1024)


# ----------------------------------------------------------------- errors ----

@pytest.mark.parametrize("name,needle", [
    ("wrn_27_10", "6n+4"),
    ("wrn_28_0", ">= 1"),
    ("wide_resnet20_2", "[18, 34, 50, 101, 152]"),
    ("wide_resnet50_0", ">= 1"),
    ("preact_resnet100", "9n+2"),
])
def test_bad_depth_or_width_names_what_is_allowed(name, needle):
    with pytest.raises(ValueError, match="got") as err:
        build_model(name)
    assert needle in str(err.value)


def test_unknown_name_lists_known_models():
    with pytest.raises(ValueError) as err:
        build_model("resnet_foo")
    message = str(err.value)
    assert "resnet_foo" in message
    for name in list_models():
        assert name in message


def test_unknown_keyword_is_a_clear_error():
    with pytest.raises(ValueError, match="dropout"):
        build_model("wide_resnet18_1", dropout=0.3)


# ------------------------------------------------------------------ init ----

def test_cifar_wrn_uses_the_original_initialisation():
    torch.manual_seed(0)
    model = build_model("wrn_16_4")
    conv = model.stage2[0].conv1  # 3x3, 64 -> 128: fan-in and fan-out differ by 2x
    expected_std = math.sqrt(2.0 / (3 * 3 * conv.in_channels))
    assert abs(conv.weight.std().item() / expected_std - 1) < 0.05
    bn = model.stage2[0].bn1
    # BN weights U(0, 1) as in the original Torch code, biases 0.
    assert 0.0 <= bn.weight.min().item() and bn.weight.max().item() <= 1.0
    assert 0.3 < bn.weight.mean().item() < 0.7
    assert torch.count_nonzero(bn.bias) == 0
    assert torch.count_nonzero(model.fc.bias) == 0
    ones = build_model("wrn_16_4", bn_weight_init="ones")
    assert torch.all(ones.stage2[0].bn1.weight == 1)


def test_wrn_28_10_stem_is_initialised_with_fan_in():
    # models/utils.lua MSRinit since "fix MSRA init": std sqrt(2 / (3 * 3 * 3)) = 0.27 for the
    # 3 -> 16 stem; the fan-out rule gave sqrt(2 / (3 * 3 * 16)) = 0.118
    # One stem has 432 weights, whose sample std scatters by ~3.4%; four fresh networks pooled
    # (1,728 weights) keep the 5% check three standard errors away from a chance failure.
    stems = []
    for seed in range(4):
        torch.manual_seed(seed)
        model = build_model("wrn_28_10")
        stems.append(model.stem.weight.detach().flatten())
    assert abs(torch.cat(stems).std().item() / math.sqrt(2.0 / 27) - 1) < 0.05
    # every conv, the 1x1 shortcuts included (their sample std is precise: many weights)
    for conv in (model.stage3[0].conv1, model.stage3[0].shortcut, model.stage3[3].conv2):
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert abs(conv.weight.std().item() / math.sqrt(2.0 / fan_in) - 1) < 0.02
    old = build_model("wrn_16_4", conv_init="fan_out")
    conv = old.stage2[0].conv1
    assert abs(conv.weight.std().item() / math.sqrt(2.0 / (9 * conv.out_channels)) - 1) < 0.05
    with pytest.raises(ValueError, match="fan_in"):
        build_model("wrn_16_4", conv_init="xavier")


def test_imagenet_wide_resnet_initialisation():
    # the authors' pretrained/wide-resnet.lua: fan-in, BN 1/0, fc bias 0; fan_out = torchvision's
    torch.manual_seed(0)
    model = build_model("wide_resnet18_2", num_classes=10)
    for conv in (model.conv1, model.layer3[0].conv1, model.layer4[0].downsample[0]):
        fan_in = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        assert abs(conv.weight.std().item() / math.sqrt(2.0 / fan_in) - 1) < 0.05
    assert torch.count_nonzero(model.fc.bias) == 0 and torch.all(model.bn1.weight == 1)
    tv_like = build_model("wide_resnet18_2", num_classes=10, conv_init="fan_out")
    conv = tv_like.layer3[0].conv1
    assert abs(conv.weight.std().item() / math.sqrt(2.0 / (9 * conv.out_channels)) - 1) < 0.05


def test_preact_resnet_strides_on_the_first_1x1_conv():
    # He's resnet-pre-act.lua and the authors' copy: Convolution(nIn, nBottleneck, 1, 1, stride, stride)
    with torch.device("meta"):
        model = build_model("preact_resnet164")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert not [c for c in convs if c.kernel_size == (3, 3) and c.stride != (1, 1)]
    assert model.stage2[0].conv1.kernel_size == (1, 1) and model.stage2[0].conv1.stride == (2, 2)
    assert model.stage3[0].conv1.stride == (2, 2) and model.stage3[0].shortcut.stride == (2, 2)
    assert sum(c.stride == (2, 2) for c in convs) == 4  # two stages: the 1x1 conv and the shortcut
    x = torch.randn(1, 3, 32, 32)
    assert build_model("preact_resnet20").eval()(x).shape == (1, 10)


def _called_layers(model, size=32):
    """Return the leaf layers in the order a forward pass of a size x size image calls them."""
    calls = []

    def describe(m, inp):
        if isinstance(m, nn.Conv2d):
            return ("conv", m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0], m.padding[0],
                    m.bias is not None)
        if isinstance(m, nn.BatchNorm2d):
            return ("bn", m.num_features, m.eps)
        if isinstance(m, nn.ReLU):
            return ("relu",)
        if isinstance(m, nn.MaxPool2d):
            return ("maxpool", m.kernel_size, m.stride, m.ceil_mode)
        if isinstance(m, nn.AvgPool2d):
            return ("avgpool", m.kernel_size, m.stride, m.ceil_mode)
        if isinstance(m, nn.AdaptiveAvgPool2d):
            # a global pool equals the Lua file's fixed kernel when that kernel covers the map
            return ("avgpool", tuple(inp[0].shape[-2:]), "global")
        if isinstance(m, nn.Linear):
            return ("linear", m.in_features, m.out_features)
        return (type(m).__name__,)

    hooks = [m.register_forward_pre_hook(lambda m, inp: calls.append(describe(m, inp)))
             for m in model.modules() if not list(m.children())]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for h in hooks:
        h.remove()
    return calls


def _block(cin, cout, k, pad, eps, bias):
    return [("conv", cin, cout, k, 1, pad, bias), ("bn", cout, eps), ("relu",)]


def test_nin_is_the_authors_nin_lua_layer_by_layer():
    # models/nin.lua: Block(...) = conv, SpatialBatchNormalization(n, 1e-5), ReLU; pools in ceil mode;
    # SpatialAveragePooling(8, 8, 1, 1), View, Linear(192, num_classes). The convs have biases as in the
    # network of logs/nin_1875527964 (1,007,242 parameters); conv_bias=False is today's nin.lua (:noBias()).
    for bias, params in ((True, 1_007_242), (False, 1_005_642)):
        lua = (_block(3, 192, 5, 2, 1e-5, bias) + _block(192, 160, 1, 0, 1e-5, bias) + _block(160, 96, 1, 0, 1e-5, bias)
               + [("maxpool", 3, 2, True)]
               + _block(96, 192, 5, 2, 1e-5, bias) + _block(192, 192, 1, 0, 1e-5, bias) * 2
               + [("avgpool", 3, 2, True)]
               + _block(192, 192, 3, 1, 1e-5, bias) + _block(192, 192, 1, 0, 1e-5, bias) * 2
               + [("avgpool", (8, 8), "global"), ("linear", 192, 10)])
        model = build_model("nin", conv_bias=bias)
        assert _called_layers(model) == lua
        assert count_parameters(model) == params
        assert not any(isinstance(m, nn.Dropout) for m in model.modules())


def test_vgg_cifar_is_the_authors_vgg_lua_layer_by_layer():
    # models/vgg.lua: Group(3,64,2,MP) Group(64,128,2,MP) Group(128,256,4,MP) Group(256,512,4,MP)
    # Group(512,512,4); Block = bias-free 3x3 conv, SpatialBatchNormalization(n, 1e-3), ReLU;
    # MP = 2x2/2 max pooling (ceil); SpatialAveragePooling(2, 2, 2, 2), View, Linear(512, num_classes)
    lua = []
    cin = 3
    for width, n, pool in ((64, 2, True), (128, 2, True), (256, 4, True), (512, 4, True), (512, 4, False)):
        for i in range(n):
            lua += _block(cin if i == 0 else width, width, 3, 1, 1e-3, False)
        cin = width
        if pool:
            lua.append(("maxpool", 2, 2, True))
    lua += [("avgpool", (2, 2), "global"), ("linear", 512, 10)]
    model = build_model("vgg_cifar")
    assert _called_layers(model) == lua
    assert sum(1 for m in model.modules() if isinstance(m, nn.Conv2d)) == 16  # "Network has 16 convolutions"
    assert count_parameters(model) == 20_035_018
    assert not any(isinstance(m, (nn.Dropout, nn.BatchNorm1d)) for m in model.modules())


def test_baselines_are_initialised_as_the_lua_files():
    # FCinit, testModel (model:reset(): Torch defaults everywhere), then MSRinit (fan-in, conv bias 0)
    torch.manual_seed(0)
    model = build_model("vgg_cifar")
    conv = model.stage4[1][0]
    assert abs(conv.weight.std().item() / math.sqrt(2.0 / (9 * conv.in_channels)) - 1) < 0.02
    bn = model.stage4[1][1]
    assert 0.0 <= bn.weight.min().item() and bn.weight.max().item() <= 1.0 and 0.4 < bn.weight.mean().item() < 0.6
    nin = build_model("nin")
    assert torch.count_nonzero(nin.stem[0].bias) == 0
    bound = 1 / math.sqrt(192)  # Torch's Linear:reset(), which also draws the bias
    assert nin.fc.bias.abs().max().item() <= bound and torch.count_nonzero(nin.fc.bias) == 10


def test_wrn_structure_follows_the_original():
    model = build_model("wrn_16_4", dropout=0.3)
    first = model.stage1[0]
    assert first.shortcut is not None and first.shortcut.kernel_size == (1, 1)  # 16 -> 64
    assert model.stage1[1].shortcut is None  # width kept: identity
    assert model.stage2[0].conv1.stride == (2, 2) and model.stage2[0].shortcut.stride == (2, 2)
    assert isinstance(first.dropout, nn.Dropout) and first.dropout.p == 0.3
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    assert model.stem.in_channels == 3 and model.stem.out_channels == 16
    assert isinstance(build_model("wrn_40_1").stage1[0].shortcut, type(None))  # k = 1: 16 -> 16


def test_shared_preactivation_feeds_the_projection_shortcut():
    # With the width changing, the shortcut reads relu(bn1(x)), not x: zero the
    # residual branch and check the block output is shortcut(relu(bn1(x))).
    block = build_model("wrn_10_2").stage1[0].eval()
    nn.init.zeros_(block.conv2.weight)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        expected = block.shortcut(torch.relu(block.bn1(x)))
        assert torch.allclose(block(x), expected, atol=1e-6)


# ------------------------------------------------------- feature protocol ----

FAMILY_CASES = [
    ("wrn_16_2", {}, 32, "cifar", ["stage1", "stage2", "stage3"], [1, 2, 4]),
    ("wide_resnet50_1", {}, 32, "imagenet", ["res2", "res3", "res4", "res5"], [4, 8, 16, 32]),
    ("wide_resnet18_2", {}, 32, "imagenet", ["res2", "res3", "res4", "res5"], [4, 8, 16, 32]),
    ("preact_resnet20", {}, 32, "cifar", ["stage1", "stage2", "stage3"], [1, 2, 4]),
    ("nin", {}, 32, "cifar", ["stage1", "stage2", "stage3"], [1, 2, 4]),
    ("vgg_cifar", {}, 32, "cifar", ["stage1", "stage2", "stage3", "stage4", "stage5"], [1, 2, 4, 8, 16]),
]


@pytest.mark.parametrize("name,kwargs,size,family,stages,strides", FAMILY_CASES)
def test_features_match_output_shape_and_stem_plus_stages_reproduce_them(name, kwargs, size, family, stages,
                                                                        strides):
    torch.manual_seed(0)
    model = build_model(name, num_classes=7, **kwargs).eval()
    assert model.family == family
    assert model.default_input_size == (224 if family == "imagenet" else 32)
    assert model.stage_names == stages
    specs = model.output_shape()
    assert list(specs) == stages and [s.stride for s in specs.values()] == strides
    assert all(isinstance(s, ShapeSpec) for s in specs.values())

    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert list(feats) == stages
        for stage, f in feats.items():
            assert f.shape == (2, specs[stage].channels, size // specs[stage].stride, size // specs[stage].stride)
        h = model.stem(x)
        for stage in stages:
            h = model.get_stage(stage)(h)
            assert torch.equal(h, feats[stage])
        logits = model(x)
    assert logits.shape == (2, 7)
    # The stem and stages are views of the network's own parameters.
    own = {id(p) for p in model.parameters()}
    assert {id(p) for p in model.stem.parameters()} <= own
    # Detection heads expect activated maps: pre-activation nets fold their
    # final BN-ReLU into the last stage.
    assert all(f.min() >= 0 for f in feats.values()) if family == "imagenet" else feats[stages[-1]].min() >= 0
    with pytest.raises(KeyError, match=stages[0]):
        model.get_stage("nope")


def test_imagenet_stem_keeps_torchvision_keys():
    model = build_model("wide_resnet18_1")
    stem_params = dict(model.stem.named_parameters())
    assert stem_params["conv1.weight"] is model.conv1.weight
    assert not any(k.startswith("stem") for k in model.state_dict())
    # a real registered module: the same object at every access, converted in place
    assert model.stem is model.stem and any(m is model.stem for m in model.children())
    keys = list(model.state_dict())
    assert keys[:2] == ["conv1.weight", "bn1.weight"] and keys[-1] == "fc.bias"  # torchvision's order too


# ------------------------------------------------------ memory efficient ----

MEMORY_CASES = [
    ("wrn_16_2", {"dropout": 0.3}, 16),
    ("wide_resnet18_1", {}, 16),
    ("preact_resnet20", {}, 16),
    ("nin", {}, 16),
    ("vgg_cifar", {}, 16),
]


@pytest.mark.parametrize("name,kwargs,size", MEMORY_CASES)
def test_memory_efficient_gives_the_same_outputs_gradients_and_bn_statistics(name, kwargs, size):
    torch.manual_seed(0)
    plain = build_model(name, num_classes=5, **kwargs).train()
    efficient = copy.deepcopy(plain)
    efficient.memory_efficient = True
    assert efficient.memory_efficient and not plain.memory_efficient

    # Count block calls: with checkpointing each block runs again in backward,
    # so the equality below is not a comparison of two identical code paths.
    # (A pre-hook: the recomputation may stop early, before the block returns.)
    block = efficient.get_stage(efficient.stage_names[-1])[-1]
    calls = []
    block.register_forward_pre_hook(lambda *a: calls.append(1))

    x = torch.randn(3, 3, size, size)
    outs, grads = [], []
    for model in (plain, efficient):
        torch.manual_seed(123)  # same dropout masks for both
        for _ in range(2):  # two steps: BN statistics must advance exactly twice
            model.zero_grad()
            y = model(x)
            (y.square().sum()).backward()
        outs.append(y)
        grads.append([p.grad.clone() for p in model.parameters()])
    assert len(calls) == 4  # 2 forwards + 2 recomputations

    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    plain_state, eff_state = plain.state_dict(), efficient.state_dict()
    assert list(plain_state) == list(eff_state)
    for key in plain_state:
        assert torch.equal(plain_state[key], eff_state[key]), key
    bn = next(m for m in efficient.modules() if isinstance(m, nn.BatchNorm2d))
    assert bn.num_batches_tracked.item() == 2


def test_memory_efficient_keyword_and_eval_path():
    model = build_model("wrn_10_1", memory_efficient=True, dropout=0.2)
    assert model.memory_efficient
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        a = model(x)
    model.memory_efficient = False
    with torch.no_grad():
        assert torch.equal(a, model(x))


# ------------------------------------------------------- conv layer choice ----

class _CountingConv(nn.Conv2d):
    """An nn.Conv2d subclass that counts its calls (a stand-in for a faster kernel)."""

    calls = 0

    def forward(self, x):
        type(self).calls += 1
        return super().forward(x)


@pytest.mark.parametrize("name", ["wrn_10_2", "wide_resnet18_1", "wide_resnet50_1", "preact_resnet11", "nin",
                                  "vgg_cifar"])
def test_conv_layer_builds_every_convolution_with_the_same_keys_and_weights(name):
    torch.manual_seed(0)
    plain = build_model(name, num_classes=5).eval()
    torch.manual_seed(0)
    chosen = build_model(name, num_classes=5, conv_layer=_CountingConv).eval()
    convs = [n for n, m in plain.named_modules() if isinstance(m, nn.Conv2d)]
    assert convs and not any(isinstance(m, _CountingConv) for m in plain.modules())
    assert [n for n, m in chosen.named_modules() if type(m) is _CountingConv] == convs
    # the same state-dict keys and initial weights: checkpoints load either way
    assert list(chosen.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(chosen.state_dict().values(), plain.state_dict().values()))
    x = torch.randn(2, 3, 32, 32)
    _CountingConv.calls = 0
    with torch.no_grad():
        assert torch.equal(chosen(x), plain(x))
    assert _CountingConv.calls == len(convs)  # every convolution ran through the chosen class
