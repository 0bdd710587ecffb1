"""ViTC-UReID on the CUHK03 crops: camera-aware proxies (method cap) on the
ViT-Ti recipe of configs/cuhk03_vit.py with TransReID's camera embedding (a
learned vector per camera, weight 3, added to every token; CUHK03 has 2
cameras). Evaluation without cameras adds the mean camera vector, the same
for every image.

    python -m jaxreid.main --config=configs/cuhk03_vitc.py --workdir=/tmp/cuhk03_vitc
"""

from cuhk03_vit import get_config as vit_config

CUHK03_CAMERAS = 2


def get_config():
    c = vit_config("cap")
    c.model.camera_embedding = CUHK03_CAMERAS
    return c
