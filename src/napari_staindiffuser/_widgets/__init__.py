"""The napari-facing parts of napari-staindiffuser (reader, writer, sample data; docks later).

napari imports these modules lazily through the npe2 manifest (``napari.yaml``); nothing here is
imported by ``import napari_staindiffuser``. Only this subpackage may import napari, Qt or
magicgui; the modules written so far need neither Qt nor magicgui.
"""
