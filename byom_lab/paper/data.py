"""The paper's 8 datasets from local folders: layouts, class names, templates, uint8 splits.

Layouts read (folder names as torchvision / task-vectors write them, see FOLDERS):
- ImageFolder per split, any dataset: `<root>/<Dataset>/{train,val,test}/<class>/*.jpg|png|...`
  (task-vectors' RESISC45, EuroSAT (`EuroSAT_splits`), DTD, SUN397 splits); `val` is optional;
- MNIST raw idx files: `<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]`;
- SVHN .mat files: `<root>/svhn/{train,test}_32x32.mat` (needs scipy);
- GTSRB (torchvision): `<root>/gtsrb/GTSRB/Training/<class>/*.ppm`, `.../Final_Test/Images/*.ppm`
  and `<root>/gtsrb/GT-final_test.csv`;
- Stanford Cars (torchvision): `<root>/stanford_cars/{cars_train,cars_test}/*.jpg`,
  `devkit/{cars_meta,cars_train_annos}.mat` and `cars_test_annos_withlabels.mat` (needs scipy).
Without a `val` split, one is carved from train exactly as task-vectors does (10% up to 5000,
`random_split` with seed 0).
"""
import csv
import gzip
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
VAL_FRACTION, MAX_VAL, VAL_SEED = 0.1, 5000, 0  # task-vectors' split_train_into_train_val
FOLDERS = {"SUN397": ["SUN397", "sun397"], "Cars": ["Cars", "cars", "stanford_cars"],
           "RESISC45": ["RESISC45", "resisc45"], "EuroSAT": ["EuroSAT", "EuroSAT_splits", "eurosat"],
           "SVHN": ["SVHN", "svhn"], "GTSRB": ["GTSRB", "gtsrb"], "MNIST": ["MNIST", "mnist"], "DTD": ["DTD", "dtd"]}
# zero-shot templates of task-vectors (src/datasets/templates.py)
TEMPLATES = {
    "SUN397": ["a photo of a {c}.", "a photo of the {c}."],
    "Cars": [f"{p} {{c}}{e}" for p, e in (("a photo of a", "."), ("a photo of the", "."), ("a photo of my", "."),
             ("i love my", "!"), ("a photo of my dirty", "."), ("a photo of my clean", "."),
             ("a photo of my new", "."), ("a photo of my old", "."))],
    "RESISC45": [f"{s} {v} of {a}{{c}}." for a in ("", "a ", "the ") for v in ("imagery", "photo", "view")
                 for s in ("satellite", "aerial")],
    "EuroSAT": ["a centered satellite photo of {c}.", "a centered satellite photo of a {c}.",
                "a centered satellite photo of the {c}."],
    "SVHN": ['a photo of the number: "{c}".'],
    "GTSRB": ['a zoomed in photo of a "{c}" traffic sign.', 'a centered photo of a "{c}" traffic sign.',
              'a close up photo of a "{c}" traffic sign.'],
    "MNIST": ['a photo of the number: "{c}".'],
    "DTD": [f"a photo of {a} {{c}} {w}." for a in ("a", "the") for w in ("texture", "pattern", "thing", "object")],
}
EUROSAT_NAMES = {  # task-vectors' names for EuroSAT's folders (keys: folder name, lowercase, no separators)
    "annualcrop": "annual crop land", "forest": "forest", "herbaceousvegetation": "brushland or shrubland",
    "highway": "highway or road", "industrial": "industrial buildings or commercial buildings",
    "pasture": "pasture land", "permanentcrop": "permanent crop land",
    "residential": "residential buildings or homes or apartments", "river": "river", "sealake": "lake or sea"}
_SIGN = "red and white circle", "red and white triangle", "blue circle with white", "white circle with gray strike bar"
GTSRB_NAMES = [  # CLIP's GTSRB prompts (openai/CLIP data/prompts.md), as task-vectors uses them
    *[f"{_SIGN[0]} {s} kph speed limit" for s in (20, 30, 50, 60, 70, 80)],
    "end / de-restriction of 80 kph speed limit",
    f"{_SIGN[0]} 100 kph speed limit", f"{_SIGN[0]} 120 kph speed limit",
    f"{_SIGN[0]} red car and black car no passing", f"{_SIGN[0]} red truck and black car no passing",
    f"{_SIGN[1]} road intersection warning", "white and yellow diamond priority road",
    "red and white upside down triangle yield right-of-way", "stop", "empty red and white circle",
    f"{_SIGN[0]} no truck entry", "red circle with white horizonal stripe no entry",
    f"{_SIGN[1]} with exclamation mark warning", f"{_SIGN[1]} with black left curve approaching warning",
    f"{_SIGN[1]} with black right curve approaching warning", f"{_SIGN[1]} with black double curve approaching warning",
    f"{_SIGN[1]} rough / bumpy road warning", f"{_SIGN[1]} car skidding / slipping warning",
    f"{_SIGN[1]} with merging / narrow lanes warning",
    f"{_SIGN[1]} with person digging / construction / road work warning",
    f"{_SIGN[1]} with traffic light approaching warning", f"{_SIGN[1]} with person walking warning",
    f"{_SIGN[1]} with child and person walking warning", f"{_SIGN[1]} with bicyle warning",
    f"{_SIGN[1]} with snowflake / ice warning", f"{_SIGN[1]} with deer warning", f"{_SIGN[3]} no speed limit",
    *[f"{_SIGN[2]} {a} mandatory" for a in ("right turn arrow", "left turn arrow", "forward arrow",
                                            "forward or right turn arrow", "forward or left turn arrow",
                                            "keep right arrow", "keep left arrow")],
    f"{_SIGN[2]} arrows indicating a traffic circle", f"{_SIGN[3]} indicating no passing for cars has ended",
    f"{_SIGN[3]} indicating no passing for trucks has ended"]
DIGITS = [str(i) for i in range(10)]


def expected_layouts(name: str, root) -> str:
    """Human-readable description of the folders searched for one dataset."""
    base = " or ".join(str(Path(root) / f) for f in FOLDERS[name])
    extra = {"MNIST": "raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte (torchvision MNIST), or ",
             "SVHN": "{train,test}_32x32.mat (torchvision SVHN), or ",
             "GTSRB": "GTSRB/Training/<class>/*.ppm + GTSRB/Final_Test/Images + GT-final_test.csv, or ",
             "Cars": "cars_train/, cars_test/, devkit/cars_meta.mat, devkit/cars_train_annos.mat and "
                     "cars_test_annos_withlabels.mat (torchvision StanfordCars), or "}
    return f"{base} holding {extra.get(name, '')}{{train,val,test}}/<class>/<image> (ImageFolder, val optional)"


def class_names(dataset: str, folders: list) -> list:
    """Zero-shot class names from class folder names: humanised, with task-vectors' names where known."""
    keys = [f.replace("_", "").replace(" ", "").lower() for f in folders]
    if dataset == "EuroSAT" and all(k in EUROSAT_NAMES for k in keys):
        return [EUROSAT_NAMES[k] for k in keys]
    if dataset == "GTSRB" and len(folders) == 43 and all(f.isdigit() for f in folders):
        return list(GTSRB_NAMES)
    return [f.replace("_", " ") for f in folders]


def _image_files(folder: Path, classes: list) -> tuple:
    items, labels = [], []
    for i, c in enumerate(classes):
        files = sorted(p for p in (folder / c).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        items += files
        labels += [i] * len(files)
    return items, np.asarray(labels, dtype=np.int64)


def read_image_folder(folder: Path) -> tuple:
    """({split: (paths, labels)}, class folder names) of an ImageFolder-per-split layout."""
    classes = sorted(e.name for e in os.scandir(folder / "train") if e.is_dir())
    if not classes:
        raise FileNotFoundError(f"no class folders in {folder / 'train'}")
    for split in ("val", "test"):
        if (folder / split).is_dir():
            other = sorted(e.name for e in os.scandir(folder / split) if e.is_dir())
            if other != classes:
                raise ValueError(f"{folder / split} has class folders {other[:5]}..., train has {classes[:5]}...")
    return {s: _image_files(folder / s, classes) for s in SPLITS if (folder / s).is_dir()}, classes


def _idx_file(raw: Path, stem: str) -> np.ndarray:
    path = raw / stem if (raw / stem).is_file() else raw / f"{stem}.gz"
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    ndim = data[3]  # magic: 0, 0, dtype 0x08 (uint8), number of dimensions
    dims = np.frombuffer(data, dtype=">i4", count=ndim, offset=4)
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def read_mnist(folder: Path) -> tuple:
    """({split: (images (n, 28, 28) uint8, labels)}, classes) from torchvision's raw MNIST files."""
    raw = folder / "raw" if (folder / "raw").is_dir() else folder
    out = {}
    for split, stem in (("train", "train"), ("test", "t10k")):
        images, labels = _idx_file(raw, f"{stem}-images-idx3-ubyte"), _idx_file(raw, f"{stem}-labels-idx1-ubyte")
        if len(images) != len(labels):
            raise ValueError(f"{raw}: {stem} has {len(images)} images but {len(labels)} labels")
        out[split] = (images, labels.astype(np.int64))
    return out, DIGITS


def read_svhn(folder: Path) -> tuple:
    """({split: (images (n, 32, 32, 3) uint8, labels)}, classes) from torchvision's SVHN .mat files."""
    from scipy.io import loadmat

    out = {}
    for split in ("train", "test"):
        mat = loadmat(str(folder / f"{split}_32x32.mat"))
        labels = mat["y"].reshape(-1).astype(np.int64) % 10  # SVHN labels the digit 0 as 10
        out[split] = (np.ascontiguousarray(mat["X"].transpose(3, 0, 1, 2)), labels)
    return out, DIGITS


def read_gtsrb(folder: Path) -> tuple:
    """({split: (paths, labels)}, class folder names) from torchvision's GTSRB layout."""
    train_dir = folder / "GTSRB" / "Training"
    classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
    out = {"train": _image_files(train_dir, classes)}
    with open(folder / "GT-final_test.csv") as f:
        rows = list(csv.DictReader(f, delimiter=";", skipinitialspace=True))
    test_dir = folder / "GTSRB" / "Final_Test" / "Images"
    out["test"] = ([test_dir / r["Filename"] for r in rows], np.asarray([int(r["ClassId"]) for r in rows]))
    return out, classes


def read_cars_devkit(folder: Path) -> tuple:
    """({split: (paths, labels)}, class names) from torchvision's Stanford Cars layout (1-based classes in the .mat)."""
    from scipy.io import loadmat

    names = [str(n) for n in loadmat(str(folder / "devkit" / "cars_meta.mat"), squeeze_me=True)["class_names"]]
    out = {}
    for split, annotations, images in (("train", folder / "devkit" / "cars_train_annos.mat", folder / "cars_train"),
                                       ("test", folder / "cars_test_annos_withlabels.mat", folder / "cars_test")):
        rows = np.atleast_1d(loadmat(str(annotations), squeeze_me=True)["annotations"])
        labels = np.asarray([int(r["class"]) - 1 for r in rows], dtype=np.int64)
        if len(labels) and not (0 <= labels.min() and labels.max() < len(names)):
            raise ValueError(f"{annotations}: class ids {labels.min() + 1}..{labels.max() + 1} outside 1..{len(names)}")
        out[split] = ([images / str(r["fname"]) for r in rows], labels)
    return out, names


def find_dataset(root, name: str) -> tuple:
    """(reader, folder, layout name) of the first known layout found for a dataset under root."""
    if name not in FOLDERS:
        raise ValueError(f"unknown dataset {name!r}; valid: {list(FOLDERS)}")
    for folder in (Path(root) / f for f in FOLDERS[name]):
        if (folder / "train").is_dir() and (folder / "test").is_dir():
            return read_image_folder, folder, "imagefolder"
        raw = folder / "raw" if (folder / "raw").is_dir() else folder
        if name == "MNIST" and any(raw.glob("train-images-idx3-ubyte*")):
            return read_mnist, folder, "mnist-idx"
        if name == "SVHN" and (folder / "train_32x32.mat").is_file():
            return read_svhn, folder, "svhn-mat"
        if name == "GTSRB" and (folder / "GTSRB" / "Training").is_dir():
            return read_gtsrb, folder, "gtsrb-torchvision"
        if name == "Cars" and (folder / "devkit" / "cars_meta.mat").is_file():
            return read_cars_devkit, folder, "cars-devkit"
    raise FileNotFoundError(f"dataset {name} not found under {root}; expected {expected_layouts(name, root)}")


def carve_val(n: int, fraction: float = VAL_FRACTION, max_val: int = MAX_VAL, seed: int = VAL_SEED) -> tuple:
    """(train indices, val indices): torch random_split of range(n) as task-vectors' *Val datasets do."""
    n_val = max(1, min(int(n * fraction), max_val))  # at least one image, for tiny folders
    if n_val >= n:
        raise ValueError(f"cannot carve a validation split from {n} training images")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return perm[:n - n_val], perm[n - n_val:]


def subsample(idx: list, max_images: int = None, seed: int = 0) -> list:
    """At most max_images of idx: a seeded random subset, in the original order."""
    if not max_images or len(idx) <= max_images:
        return list(idx)
    keep = sorted(torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:max_images].tolist())
    return [idx[i] for i in keep]


def resize_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """(3, size, size) uint8: shorter side to size (bicubic), then a centre crop, as open_clip's eval transform."""
    image = image.convert("RGB")
    w, h = image.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    if (nw, nh) != (w, h):
        image = image.resize((nw, nh), Image.BICUBIC)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    return np.asarray(image.crop((left, top, left + size, top + size))).transpose(2, 0, 1)


def _decode(item, size: int) -> np.ndarray:
    if isinstance(item, np.ndarray):
        return resize_center_crop(Image.fromarray(item), size)
    with Image.open(item) as im:
        return resize_center_crop(im, size)


def to_uint8(items, size: int, workers: int = None) -> torch.Tensor:
    """(n, 3, size, size) uint8 tensor of image files or arrays."""
    if len(items) == 0:
        return torch.zeros(0, 3, size, size, dtype=torch.uint8)
    with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
        return torch.from_numpy(np.stack(list(pool.map(lambda it: _decode(it, size), items))))


def load_dataset(root, name: str, image_size: int, max_images: int = None) -> tuple:
    """({split: (uint8 images (n, 3, S, S), labels (n,))}, class names, info) of one dataset."""
    reader, folder, layout = find_dataset(root, name)
    splits, folders = reader(folder)
    if "val" not in splits:
        items, labels = splits["train"]
        tr, va = carve_val(len(labels))
        splits["train"], splits["val"] = [([items[i] for i in ix], labels[ix]) for ix in (tr, va)]
    data, sizes = {}, {}
    for s in SPLITS:
        items, labels = splits[s]
        keep = subsample(range(len(labels)), max_images)
        data[s] = (to_uint8([items[i] for i in keep], image_size), torch.as_tensor(labels[keep], dtype=torch.long))
        sizes[s] = f"{len(keep)} of {len(labels)}"
    val = "folder" if (folder / "val").is_dir() else f"carved from train ({VAL_FRACTION:.0%}, seed {VAL_SEED})"
    info = {"path": str(folder), "layout": layout, "sizes": sizes, "val": val}
    return data, class_names(name, folders), info
