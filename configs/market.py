"""SCL on Market-1501, the paper's released configuration (see
configs/recipes.py and scl-method.md).

    python -m jaxreid.main --config=configs/market.py --workdir=W \
        --config.data.root=/data/Market-1501-v15.09.15 \
        --config.model.pretrained=/weights/resnet50-0676ba61.pth
"""

from recipes import scl_paper_config


def get_config():
    return scl_paper_config("market1501", "~/datasets/market1501")
