"""Write a 512 x 512 x 150 head CT (a paper-size phantom) for prediction timing.

    python bench/make_big_ct.py /tmp/big/big_0000.nii.gz
"""

import sys

from sats.data.io import write_image
from sats.data.phantom import PhantomConfig, make_case

case = make_case(0, 0, "Ts", PhantomConfig(size="paper"))
write_image(case.ct, sys.argv[1])
print(case.ct.shape)
