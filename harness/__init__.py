"""Tools that drive a real ComfyUI checkout: locate it, load the pack, run graphs.

Used by the ComfyUI test tier, the headless runner and the main-job command.
Nothing here is imported when ComfyUI loads the pack.
"""
