"""nerveseg: segment and measure peripheral nerves in ultrasound images.

Implements the scale-attentional U-Net (SA-UNet) of Kim et al., "Scale-attentional U-Net for
the segmentation of the median nerve in ultrasound images", Ultrasonography 2022;41:706-717.
"""

__version__ = "0.1.0"
