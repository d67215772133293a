"""Drop repeated scripts from each page.

sphinx-thebe 0.3.1 and sphinx-togglebutton register their inline configuration
(`const THEBE_JS_URL = ...`) from events that Jupyter Book 1.x fires more than once, so every page
declared the same `const` twice and the browser reported "Identifier 'THEBE_JS_URL' has already
been declared". Keeping the first copy of each identical script fixes it without touching the theme.
"""


def _unique(scripts):
    seen, kept = set(), []
    for script in scripts:
        name = getattr(script, "filename", script) or ""  # an inline script may say None or ""
        key = (str(name), tuple(sorted(getattr(script, "attributes", {}).items())))
        if key not in seen:
            seen.add(key)
            kept.append(script)
    return kept


def _dedupe_builder(app, env):
    if hasattr(app.builder, "_js_files"):
        app.builder._js_files[:] = _unique(app.builder._js_files)


def _dedupe_page(app, pagename, templatename, context, doctree):
    if "script_files" in context:
        context["script_files"][:] = _unique(context["script_files"])  # in place: later handlers append to it


def setup(app):
    app.connect("env-updated", _dedupe_builder)
    app.connect("html-page-context", _dedupe_page, priority=100)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
