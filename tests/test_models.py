"The models (notebook 02): every architecture's output shape, the input checks, and the fused generator step against Table 7's upsample-then-conv."
import pytest, torch

from tgr.core import TGRError
from tgr.models import MODELS, MIN_IMG_SIZE, Generator, build_model, count_params
from tgr.inversion import generator_forward


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize("img_size,in_ch", [(32, 3), (16, 1)])
def test_every_architecture_maps_images_to_logits(arch, img_size, in_ch):
    torch.manual_seed(0)
    net = build_model(arch, 5, img_size, in_ch).eval()
    with torch.no_grad(): out = net(torch.rand(3, in_ch, img_size, img_size))
    assert out.shape == (3, 5) and torch.isfinite(out).all() and count_params(net) > 0


def test_bad_sizes_are_explained():
    with pytest.raises(TGRError, match="n_classes must be an integer >= 1"): build_model("conv4", 0, 32)
    with pytest.raises(TGRError, match=f"img_size must be an integer >= {MIN_IMG_SIZE}"): build_model("conv4", 5, 8)
    with pytest.raises(TGRError, match="in_ch must be an integer >= 1, got 0; use 3 for RGB"): build_model("conv4", 5, 32, in_ch=0)
    with pytest.raises(TGRError, match="conv5"): build_model("conv5", 5, 32)
    with pytest.raises(TGRError, match="ngf must be an integer >= 1"): Generator(ngf=0)


@pytest.mark.parametrize("img_size", [32, 28])
def test_fused_generator_step_equals_upsample_then_conv(img_size):
    "28 is not a multiple of 4: generator_forward falls back to the plain forward, and both paths agree."
    torch.manual_seed(0)
    G, z = Generator(z_dim=16, ngf=8, img_size=img_size).train(), torch.randn(6, 16)
    plain, fused = G(z), generator_forward(G, z, True)
    assert plain.shape == (6, 3, img_size, img_size) and (plain.min() >= 0) and (plain.max() <= 1)
    assert torch.allclose(plain, fused, atol=1e-5), (plain - fused).abs().max()
