"""Host-side image preprocessors that turn a user's picture into a control map (NumPy, uint8 in and
out). ``canny`` is OpenCV's ``cv2.Canny`` restated; depth, pose and the like are out of scope: users
pass their own map."""

from refsd.preprocess.canny import canny

__all__ = ["canny"]
