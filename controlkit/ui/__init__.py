"""The web page: `controlkit ui` serves a local page over the library (generate, preprocessors, ControlNets).

    models.py         what is served: one base and its ControlNets by name, loaded once and shared by every user
    preprocessing.py  the preprocessors that are ready here, their page parameters, condition maps, annotation
    generation.py     one page request -> `controlkit.pipeline.generate` -> PNGs with their settings
    uploads.py        the page's upload components: files only, never fetched from a URL
    units.py          the widgets of one control unit (tabs `Control 1..3`) and of a preprocessor's parameters
    app.py            the page (gradio Blocks) and its events
    server.py         offline launch: local fonts only, no analytics, no outside fetches, a temporary folder
    __main__.py       `python -m controlkit.ui`: what `controlkit ui` starts, with its options on stdin

Like the command line, it is a face: nothing imports it, and importing this package imports nothing heavy
(gradio is imported by app.py and server.py only).
"""
