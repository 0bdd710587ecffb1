"""The worked example of docs/new_method.md: instance discrimination
(jaxreid/methods/instance_nce.py) on the synthetic set of configs/synthetic.py,
with a BN-neck head instead of SCL's stripes.

    python -m jaxreid.main --config=configs/synthetic_instance_nce.py --workdir=/tmp/inst
"""

from synthetic import get_config as synthetic_config

from jaxreid.methods import set_method


def get_config():
    c = synthetic_config()
    c.model.head = "bnneck"
    # The method's declared settings, the temperature over its default.
    return set_method(c, "instance_nce", temperature=0.1)
