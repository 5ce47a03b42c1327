"""The tiny shapes world: captioned 32-px scenes and the feature network that scores samples of it."""
