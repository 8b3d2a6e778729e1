//! Preprocessors (canny, pose, depth, ...) producing control images. Not built yet: see the
//! preprocessors issue.
