"""Host-side image preprocessors that turn a user's picture into a control map (NumPy, uint8 in and
out): ``refsd.preprocess.canny.canny`` is OpenCV's ``cv2.Canny`` restated. Depth, pose and the like are
out of scope: users pass their own map."""
