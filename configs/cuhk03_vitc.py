"""ViTC-UReID on the CUHK03 crops: camera-aware proxies (method cap) on the
ViT-Ti recipe of configs/cuhk03_vit.py with TransReID's camera embedding (a
learned vector per camera, weight 3, added to every token; the shared CUHK03
crops name 10 cameras, c1-c10: its five camera pairs). Evaluation without
cameras adds the mean camera vector, the same for every image.

    python -m jaxreid.main --config=configs/cuhk03_vitc.py --workdir=/tmp/cuhk03_vitc
"""

from cuhk03_vit import get_config as vit_config

CUHK03_CAMERAS = 10  # the _cC of the file names, C = 1..10


def get_config():
    c = vit_config("cap")
    c.model.camera_embedding = CUHK03_CAMERAS
    return c
