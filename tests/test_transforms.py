"""Statistics of the method's augmentations (docs/method.md §3): not just shapes."""

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision import transforms as v1

from stpp_hf.data import fast_transforms
from stpp_hf.data.fast_transforms import (
    ColorJitter,
    FastTrainTransform,
    adjust_hue,
    planar_pixels,
    random_scale_and_crop,
)
from stpp_hf.data.normalization import IMAGENET_MEAN, IMAGENET_STD, normalize, normalize_batch
from stpp_hf.data.transforms import (
    EvalTransform,
    TrainTransform,
    cutout,
    mask_array,
    pad_and_crop,
    random_hflip,
    random_scale,
)


def _noise_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _mask(array):
    return Image.fromarray(np.asarray(array, dtype=np.uint8), mode="L")


@pytest.mark.parametrize("width,height", [(200, 100), (90, 150)])
def test_random_scale_long_side_range_and_rounding(width, height):
    """With a crop larger than 2 * base the whole resized image sits in the crop: its extent is the
    non-ignore region of the (all-zero) mask."""
    torch.manual_seed(0)
    image = _noise_image(width, height)
    mask = mask_array(_mask(np.zeros((height, width))), image.size)
    long_sides = []
    for _ in range(400):
        _, out = random_scale_and_crop(image, mask, base_size=64, crop_size=130)
        inside = out != 255
        new_height, new_width = int(inside.any(axis=1).sum()), int(inside.any(axis=0).sum())
        assert inside.sum() == new_height * new_width  # a top-left rectangle
        long_side = max(new_width, new_height)
        long_sides.append(long_side)
        # aspect kept, short side rounded half up
        assert min(new_width, new_height) == int(min(width, height) * long_side / max(width, height) + 0.5)
        assert (new_width >= new_height) == (width >= height)
    assert min(long_sides) >= 32 and max(long_sides) <= 128
    # uniform over 97 integers: both ends of the range are reached, mean near the middle
    assert min(long_sides) <= 34 and max(long_sides) >= 126
    assert abs(np.mean(long_sides) - 80) < 5


def _reference_scale_and_crop(image, mask, base_size, crop_size):
    """Spec section 3 written plainly with PIL (resize the whole image, expand, crop), drawing the same
    random numbers in the same order as the package."""
    long_side = int(torch.randint(int(base_size * 0.5), int(base_size * 2.0) + 1, ()))
    width, height = image.size
    size = (
        (int(width * long_side / height + 0.5), long_side)
        if height > width
        else (long_side, int(height * long_side / width + 0.5))
    )
    image, mask = image.resize(size, Image.BILINEAR), mask.resize(size, Image.NEAREST)
    pad = (0, 0, max(crop_size - size[0], 0), max(crop_size - size[1], 0))
    image, mask = ImageOps.expand(image, border=pad, fill=0), ImageOps.expand(mask, border=pad, fill=255)
    left = int(torch.randint(0, image.size[0] - crop_size + 1, ()))
    top = int(torch.randint(0, image.size[1] - crop_size + 1, ()))
    box = (left, top, left + crop_size, top + crop_size)
    return image.crop(box), mask.crop(box), left


@pytest.mark.parametrize("width,height,base_size,crop_size", [(77, 53, 60, 40), (53, 77, 60, 64), (120, 90, 50, 48)])
def test_fused_scale_and_crop_equals_the_plain_reference(width, height, base_size, crop_size):
    """Resizing only the crop window gives the reference's pixels: bilinear image, nearest mask."""
    image = _noise_image(width, height)
    labels = np.random.default_rng(1).choice([0, 7, 200], size=(height, width)).astype(np.uint8)
    lefts = set()
    for seed in range(60):
        torch.manual_seed(seed)
        fused_image, fused_mask = random_scale_and_crop(
            image, mask_array(_mask(labels), image.size), base_size, crop_size
        )
        torch.manual_seed(seed)
        expected_image, expected_mask, left = _reference_scale_and_crop(image, _mask(labels), base_size, crop_size)
        lefts.add(left)
        assert fused_image.size == (crop_size, crop_size) and fused_mask.shape == (crop_size, crop_size)
        assert np.array_equal(fused_mask, np.asarray(expected_mask))
        difference = np.abs(np.asarray(fused_image, dtype=int) - np.asarray(expected_image, dtype=int))
        assert difference.max() <= 1 and difference.mean() < 0.5  # 8-bit rounding of PIL's intermediate pass only
    assert len(lefts) > 5  # the crop position is drawn, not fixed


@pytest.mark.parametrize("width,height", [(70, 50), (50, 70)])
def test_weak_train_transform_equals_the_plain_reference(width, height):
    """The whole weak path (fused scale + crop, flip, to tensor, then the trainer's batch normalisation)
    against the spec written plainly with PIL and torchvision v1, under the same draws: labels
    bit-identical, pixels within one grey level."""
    image = _noise_image(width, height, seed=3)
    labels = np.random.default_rng(2).choice([0, 5, 19], size=(height, width)).astype(np.uint8)
    transform = FastTrainTransform(base_size=60, crop_size=48)
    flips, differences = 0, []
    for seed in range(40):
        torch.manual_seed(seed)
        pixels, out_labels = transform(image, _mask(labels))
        assert pixels.dtype == torch.uint8 and out_labels.dtype == torch.uint8
        pixel_values = normalize_batch(pixels[None])[0]
        torch.manual_seed(seed)
        expected_image, expected_mask, _ = _reference_scale_and_crop(image, _mask(labels), 60, 48)
        if torch.rand(()) < 0.5:
            flips += 1
            expected_image, expected_mask = ImageOps.mirror(expected_image), ImageOps.mirror(expected_mask)
        assert torch.equal(out_labels, torch.from_numpy(np.array(expected_mask)))
        expected = v1.Normalize(IMAGENET_MEAN, IMAGENET_STD)(v1.ToTensor()(expected_image))
        assert pixel_values.dtype == torch.float32 and pixel_values.shape == expected.shape
        grey_levels = ((pixel_values - expected).abs() * 255 * torch.tensor(IMAGENET_STD).view(3, 1, 1)).round()
        differences.append(grey_levels.flatten())
    assert 8 <= flips <= 32
    # the fused resize's 8-bit intermediate rounding: mostly 0 or 1 grey level, 2 on rare pixels of noise
    differences = torch.cat(differences)
    assert differences.max() <= 2 and (differences > 1).float().mean() < 1e-3 and differences.mean() < 0.5


def test_normalize_matches_the_imagenet_formula():
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 17, 23), dtype=np.uint8))
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    expected = (pixels.double() / 255 - mean.double()) / std.double()
    for source in (pixels, Image.fromarray(pixels.permute(1, 2, 0).numpy())):
        normalized = normalize(source)
        assert normalized.dtype == torch.float32 and normalized.shape == (3, 17, 23)
        assert (normalized.double() - expected).abs().max() < 1e-6
    batch = normalize_batch(torch.stack([pixels, pixels.flip(-1)]))
    assert batch.dtype == torch.float32 and batch.shape == (2, 3, 17, 23)
    assert (batch[0].double() - expected).abs().max() < 1e-6 and (
        batch[1].double() - expected.flip(-1)
    ).abs().max() < 1e-6
    for wrong in (pixels[None].float(), pixels):
        with pytest.raises(ValueError, match=r"expected a \[B, 3, H, W\] uint8 batch"):
            normalize_batch(wrong)


def test_planar_pixels_equal_pil_to_tensor():
    image = _noise_image(23, 17, seed=4)
    pixels = planar_pixels(image)
    assert pixels.dtype == torch.uint8 and pixels.shape == (3, 17, 23) and pixels.is_contiguous()
    assert torch.equal(pixels, torch.from_numpy(np.array(image)).permute(2, 0, 1))


@pytest.mark.parametrize("strong", [False, True])
def test_batch_normalisation_is_bit_identical_to_the_per_sample_path(strong):
    """Real crops: normalising the collated uint8 batch gives exactly what normalising each item's
    PIL crop (the weak path before the move) or uint8 tensor (the strong path) gave."""
    torch.manual_seed(0)
    transform = FastTrainTransform(base_size=64, crop_size=40, strong=strong)
    items = [transform(_noise_image(70, 50, seed), _mask(np.zeros((50, 70)))) for seed in range(8)]
    batch = normalize_batch(default_collate(items)[0])
    for pixels, normalized in zip((pixels for pixels, _ in items), batch):
        assert torch.equal(normalized, normalize(pixels))
        assert torch.equal(normalized, normalize(Image.fromarray(pixels.permute(1, 2, 0).numpy())))


def test_masks_are_never_interpolated():
    torch.manual_seed(0)
    labels = np.random.default_rng(0).choice([0, 7, 200], size=(40, 60)).astype(np.uint8)
    image, mask = _noise_image(60, 40), _mask(labels)
    for strong in (False, True):
        transform = FastTrainTransform(base_size=50, crop_size=48, strong=strong)
        seen = set()
        for _ in range(60):
            _, out = transform(image, mask)
            assert out.dtype == torch.uint8 and out.shape == (48, 48)
            seen.update(out.unique().tolist())
        # only the original values and the pad / cutout ignore value, never a blend such as 3 or 100
        assert seen <= {0, 7, 200, 255}
        assert {0, 7, 200} <= seen


def test_pad_right_bottom_with_image_zero_and_mask_ignore():
    torch.manual_seed(0)
    image = Image.new("RGB", (20, 10), (100, 150, 200))
    mask = mask_array(_mask(np.full((10, 20), 3)), image.size)
    for _ in range(20):
        padded, padded_mask = random_scale_and_crop(image, mask, base_size=20, crop_size=48)
        pixels = np.asarray(padded)
        new_height, new_width = int((padded_mask == 3).any(axis=1).sum()), int((padded_mask == 3).any(axis=0).sum())
        assert padded.size == (48, 48) and 10 <= new_width <= 40 and new_height == int(new_width / 2 + 0.5)
        # the resized original sits at the top-left: padding only on the right and bottom
        assert (pixels[:new_height, :new_width] == (100, 150, 200)).all()
        assert (pixels[new_height:] == 0).all() and (pixels[:, new_width:] == 0).all()
        assert (padded_mask[:new_height, :new_width] == 3).all()
        assert (padded_mask[new_height:] == 255).all() and (padded_mask[:, new_width:] == 255).all()


def test_flip_is_joint_with_probability_half():
    torch.manual_seed(0)
    columns = np.tile(np.arange(30, dtype=np.uint8), (20, 1))
    image = Image.fromarray(np.stack([columns] * 3, axis=-1))
    mask = torch.from_numpy(mask_array(_mask(columns), image.size))
    flips = 0
    for _ in range(400):
        flipped, flipped_mask = random_hflip(image, mask)
        pixels = np.asarray(flipped)[..., 0]
        assert (flipped_mask.numpy() == pixels).all()
        flips += int(pixels[0, 0] == 29)
    assert 160 <= flips <= 240  # Binomial(400, 0.5): > 4 sigma margin


def test_train_transform_keeps_image_and_mask_aligned():
    """Left half red = class 1, right half blue = class 2: after every augmentation, class-1 pixels are red."""
    torch.manual_seed(0)
    pixels = np.zeros((60, 80, 3), dtype=np.uint8)
    pixels[:, :40] = (255, 0, 0)
    pixels[:, 40:] = (0, 0, 255)
    labels = np.ones((60, 80), dtype=np.uint8)
    labels[:, 40:] = 2
    transform = FastTrainTransform(base_size=80, crop_size=48)
    for _ in range(50):
        rgb, mask = transform(Image.fromarray(pixels), _mask(labels))
        interior = torch.nn.functional.max_pool2d((mask != 1).float()[None], 3, 1, 1)[0] == 0  # away from edges
        assert (rgb[0][interior] > 200).all() and (rgb[2][interior] < 55).all()
        interior = torch.nn.functional.max_pool2d((mask != 2).float()[None], 3, 1, 1)[0] == 0
        assert (rgb[2][interior] > 200).all() and (rgb[0][interior] < 55).all()


def test_cutout_box_area_ratio_values_and_mask_fill():
    torch.manual_seed(0)
    height, width = 100, 120
    areas, corners, applied = [], [], 0
    for _ in range(300):
        image = torch.full((3, height, width), 7, dtype=torch.uint8)
        mask = torch.zeros((1, height, width), dtype=torch.uint8)
        image, mask = cutout(image, mask)
        box = mask[0] == 255
        changed = (image != 7).any(dim=0)
        if not box.any():
            assert not changed.any()
            continue
        applied += 1
        rows, cols = box.any(dim=1).nonzero(), box.any(dim=0).nonzero()
        box_height, box_width = int(rows.max() - rows.min() + 1), int(cols.max() - cols.min() + 1)
        assert box.sum() == box_height * box_width  # one rectangle, fully inside the image
        assert 0.3 * 0.8 <= box_height / box_width <= 1 / 0.3 * 1.25
        areas.append(box.sum().item() / (height * width))
        corners.append((int(rows.min()), int(cols.min())))
        # random values only inside the box (uniform 0..255: mean ~127.5, std ~74)
        assert not (changed & ~box).any()
        values = image[:, box].float()
        assert abs(values.mean().item() - 127.5) < 20 and values.std().item() > 55
    assert 110 <= applied <= 190  # p = 0.5
    assert min(areas) >= 0.012 and max(areas) <= 0.4
    assert 0.1 < np.mean(areas) < 0.25
    tops, lefts = zip(*corners)  # the corner is drawn anywhere the box fits
    assert min(tops) <= 2 and max(tops) >= height // 2 and min(lefts) <= 2 and max(lefts) >= width // 2


@pytest.mark.slow
def test_strong_augmentation_only_when_asked():
    """Weak never writes 255 (no padding needed here) nor grays the image; strong does both at the spec's rates."""
    torch.manual_seed(0)
    image = _noise_image(96, 96)
    mask = _mask(np.zeros((96, 96)))
    results = {}
    for strong in (False, True):
        transform = FastTrainTransform(base_size=96, crop_size=40, strong=strong)
        cutouts = grays = 0
        for _ in range(200):
            pixels, labels = transform(image, mask)
            cutouts += int((labels == 255).any())
            rgb = pixels[:, labels != 255].int()
            grays += int((rgb.max(dim=0).values == rgb.min(dim=0).values).all())
        results[strong] = (cutouts, grays)
    assert results[False] == (0, 0)
    cutouts, grays = results[True]
    assert 70 <= cutouts <= 130  # p = 0.5
    assert 18 <= grays <= 65  # p = 0.2 (grayscale after jitter keeps three equal channels)


def test_eval_transform_normalises_full_image():
    image = Image.new("RGB", (33, 21), (255, 128, 0))
    pixels, labels = EvalTransform()(image, _mask(np.full((21, 33), 4)))
    expected = (torch.tensor([255, 128, 0]) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    assert pixels.shape == (3, 21, 33) and labels.shape == (21, 33) and labels.dtype == torch.int64
    assert torch.allclose(pixels[:, 5, 7], expected, atol=1e-6)
    assert (labels == 4).all()
    pixels, labels = EvalTransform()(image.convert("L"), None)
    assert pixels.shape == (3, 21, 33) and labels is None


def test_bad_masks_are_rejected():
    image = Image.new("RGB", (10, 10))
    with pytest.raises(ValueError, match="10x10 but its mask is 12x10"):
        EvalTransform()(image, _mask(np.zeros((10, 12))))
    with pytest.raises(ValueError, match="mode 'RGB'"):
        TrainTransform(16, 8)(image, Image.new("RGB", (10, 10)))
    with pytest.raises(ValueError, match="needs a mask"):
        TrainTransform(16, 8)(image, None)
    assert mask_array(_mask(np.zeros((10, 10))), (10, 10)).dtype == np.uint8


class _SameImage(Dataset):
    def __init__(self):
        self.image, self.mask = _noise_image(64, 64), _mask(np.zeros((64, 64)))
        self.transform = FastTrainTransform(base_size=64, crop_size=32, strong=True)

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return self.transform(self.image, self.mask)[0]


def _loader_outputs(seed):
    loader = DataLoader(_SameImage(), batch_size=1, num_workers=2, generator=torch.Generator().manual_seed(seed))
    return torch.cat(list(loader))


def test_seeded_reproducible_and_distinct_across_workers():
    first, again, other = _loader_outputs(0), _loader_outputs(0), _loader_outputs(1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # items 0 and 1 come from different workers: different draws of the same image
    assert not torch.equal(first[0], first[1])
    flat = first.flatten(1)
    assert len({tuple(row[:50].tolist()) for row in flat}) == len(flat)


def _every_colour() -> Image.Image:
    codes = np.arange(1 << 24, dtype=np.uint32)
    return Image.fromarray(
        np.stack([codes >> 16, (codes >> 8) & 255, codes & 255], axis=-1).astype(np.uint8).reshape(4096, 4096, 3)
    )


@pytest.mark.parametrize("hue_factor", [-0.5, -0.25, -0.013, 0.0, 0.1, 0.25, 0.5])
def test_adjust_hue_gives_torchvision_bytes_for_every_colour(hue_factor):
    from torchvision.transforms.v2 import functional as F

    image = _every_colour()
    assert np.array_equal(np.asarray(adjust_hue(image, hue_factor)), np.asarray(F.adjust_hue(image, hue_factor)))


def test_adjust_hue_rejects_what_it_cannot_do():
    with pytest.raises(ValueError, match="not in"):
        adjust_hue(Image.new("RGB", (4, 4)), 0.6)
    with pytest.raises(ValueError, match="RGB"):
        adjust_hue(Image.new("L", (4, 4)), 0.1)


def test_color_jitter_draws_and_returns_what_torchvision_does():
    from torchvision.transforms import v2

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    ours, reference = ColorJitter(0.5, 0.5, 0.5, 0.25), v2.ColorJitter(0.5, 0.5, 0.5, 0.25)
    for seed in range(50):
        torch.manual_seed(seed)
        jittered, next_draw = np.asarray(ours(image)), torch.rand(())
        torch.manual_seed(seed)
        expected, expected_next_draw = np.asarray(reference(image)), torch.rand(())
        assert np.array_equal(jittered, expected) and next_draw == expected_next_draw, seed


@pytest.mark.parametrize("width,height,base_size,crop_size", [(77, 53, 60, 40), (53, 77, 60, 64), (120, 90, 50, 48)])
def test_plain_scale_and_crop_is_the_reference_byte_for_byte(width, height, base_size, crop_size):
    """The package's plain steps (the definition the fast path is held to) draw and compute what the spec says."""
    image = _noise_image(width, height, seed=5)
    mask = _mask(np.random.default_rng(5).choice([0, 7, 200], size=(height, width)))
    for seed in range(20):
        torch.manual_seed(seed)
        scaled_image, scaled_mask = random_scale(image, mask, base_size)
        cropped_image, cropped_mask = pad_and_crop(scaled_image, scaled_mask, crop_size)
        torch.manual_seed(seed)
        expected_image, expected_mask, _ = _reference_scale_and_crop(image, mask, base_size, crop_size)
        assert np.array_equal(np.asarray(cropped_image), np.asarray(expected_image))
        assert np.array_equal(np.asarray(cropped_mask), np.asarray(expected_mask))


def _plain_steps_as_fused(image, mask, base_size, crop_size):
    """``random_scale_and_crop``'s signature over the plain steps."""
    image, mask = pad_and_crop(*random_scale(image, Image.fromarray(mask), base_size), crop_size)
    return image, np.array(mask)


@pytest.mark.parametrize("strong", [False, True])
def test_fast_train_transform_gives_the_plain_bytes(strong, monkeypatch):
    """FastTrainTransform against TrainTransform under the same seeds: the same labels and the same number of
    draws; the same pixels within the fused resize's rounding (weak); and, with the fused step's image swapped
    for the plain steps' one, the same pixels byte for byte (LUT hue, planar pixels, flips on tensors)."""
    image = _noise_image(70, 52, seed=6)
    mask = _mask(np.random.default_rng(6).choice([0, 5, 19], size=(52, 70)))
    plain, fast = TrainTransform(60, 40, strong=strong), FastTrainTransform(60, 40, strong=strong)

    def outputs(transform, seed):
        torch.manual_seed(seed)
        pixels, labels = transform(image, mask)
        return pixels, labels, torch.rand(())

    for seed in range(30):
        pixels, labels, next_draw = outputs(plain, seed)
        fast_pixels, fast_labels, fast_next_draw = outputs(fast, seed)
        assert fast_pixels.dtype == pixels.dtype == torch.uint8 and fast_labels.dtype == labels.dtype == torch.uint8
        assert torch.equal(fast_labels, labels) and next_draw == fast_next_draw
        if not strong:
            assert (fast_pixels.int() - pixels.int()).abs().max() <= 2
    monkeypatch.setattr(fast_transforms, "random_scale_and_crop", _plain_steps_as_fused)
    for seed in range(30):
        pixels, labels, next_draw = outputs(plain, seed)
        fast_pixels, fast_labels, fast_next_draw = outputs(fast, seed)
        assert torch.equal(fast_pixels, pixels) and torch.equal(fast_labels, labels) and next_draw == fast_next_draw
