"""Text cleaners for the offline corpus: markup (HTML, reStructuredText, POD, AsciiDoc, POS tags,
Gutenberg boilerplate) to plain prose, whitespace normalisation, splitting and grouping of documents,
and a blunt NSFW filter. Pure string functions: no files, no packages."""
import html
import re
import unicodedata

_CTRL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f\u200b\ufeff\ufffd]")


def normalize_ws(text):
    """NFC, \\n line ends, no control characters, no trailing spaces, at most one blank line in a row."""
    text = unicodedata.normalize("NFC", text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\u00a0", " ").replace("\t", "    ")
    text = _CTRL_RE.sub("", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def rewrap(text):
    """Join the lines of each paragraph into one line (for hard-wrapped prose)."""
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", text)]
    return "\n\n".join(p for p in paras if p)


def group_blocks(blocks, target_chars=4000, sep="\n\n"):
    """Concatenate consecutive small blocks (entries, sentences) into documents of ~target_chars."""
    docs, cur, size = [], [], 0
    for b in blocks:
        cur.append(b)
        size += len(b) + len(sep)
        if size >= target_chars:
            docs.append(sep.join(cur))
            cur, size = [], 0
    if cur:
        docs.append(sep.join(cur))
    return docs


_SPLITTERS = (r"(?<=\n\n)", r"(?<=\n)", r"(?<=[.!?] )", r"(?<= )")  # paragraph, line, sentence, word


def split_long(text, max_chars=40000, _level=0):
    """Cut a long document into parts of at most max_chars, at paragraph boundaries where
    possible (else lines, else sentences, else words)."""
    if len(text) <= max_chars:
        return [text]
    if _level == len(_SPLITTERS):
        return [text[i:i + max_chars] for i in range(0, len(text), max_chars)]
    out, cur = [], ""
    for part in re.split(_SPLITTERS[_level], text):
        if len(part) > max_chars:
            out += [cur] + split_long(part, max_chars, _level + 1)
            cur = ""
            continue
        if len(cur) + len(part) > max_chars:
            out.append(cur)
            cur = ""
        cur += part
    out.append(cur)
    return [d.strip() for d in out if d.strip()]


def strip_gutenberg(text):
    """Keep only the body between Project Gutenberg's START and END markers (when present)."""
    start_re = re.compile(r"^\s*(\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG|\*END\*?\s*THE SMALL PRINT)", re.I)
    end_re = re.compile(r"^\s*(\*{3}\s*)?END OF (THE |THIS )?PROJECT GUTENBERG", re.I)
    lines = text.split("\n")
    start = next((i + 1 for i, line in enumerate(lines) if start_re.match(line)), 0)
    end = next((i for i in range(start, len(lines)) if end_re.match(lines[i])), len(lines))
    return "\n".join(lines[start:end])


def detokenize(tokens):
    """Glue a list of Penn/Brown-style tokens back into ordinary text."""
    s = " ".join(tokens)
    s = re.sub(r"``\s*", '"', s)
    s = re.sub(r"\s*''", '"', s)
    s = re.sub(r"\s+([.,;:?!%)\]}])", r"\1", s)
    s = re.sub(r"([(\[{$])\s+", r"\1", s)
    return s


def strip_pos_tags(text):
    """'The/at jury/nn said/vbd ./.' -> 'The jury said.'"""
    return detokenize([t.rsplit("/", 1)[0] if "/" in t[1:] else t for t in text.split()])


# A deliberately blunt list: any sentence with one of these words (or a word starting with one
# of NSFW_STEMS) is dropped from mixed web text. Over-dropping a few clean sentences is fine.
NSFW_WORDS = set("""
anal anus arse asshole bastard bdsm bitch bitches blowjob bollocks boner boob boobs booty cock cocks
cum cumshot cunt cunts dildo ejaculate erection erotic escort escorts fag faggot fellatio fetish
genitals handjob hentai horny incest jizz masturbate masturbation milf naked nigga nigger nipple
nipples nude nudes nudity orgasm orgy penis piss porn porno pornography prostitute pussy rape raped
rapist scrotum semen sex sexual sexually sexy shit shitty slut sluts smut sperm stripper testicles
threesome tit tits titties vagina viagra voyeur wank whore whores xxx
""".split())
NSFW_STEMS = ("fuck", "porn", "masturbat", "motherfuck", "shit", "cunt", "blowjob", "horni", "slutt")
_WORD_RE = re.compile(r"[a-z]+")


def is_nsfw(text):
    words = _WORD_RE.findall(text.lower())
    return any(w in NSFW_WORDS or w.startswith(NSFW_STEMS) for w in words)


def strip_html(text, drop=()):
    """HTML -> text: drop head/script/style and the `drop` regexes, keep <pre> verbatim,
    turn block elements into paragraph breaks, unescape entities."""
    for pat in (r"<head\b.*?</head>", r"<script\b.*?</script>", r"<style\b.*?</style>", r"<!--.*?-->", *drop):
        text = re.sub(pat, " ", text, flags=re.S | re.I)
    out = []
    for i, part in enumerate(re.split(r"(<pre\b[^>]*>.*?</pre>)", text, flags=re.S | re.I)):
        if i % 2:  # a <pre> block: keep its line structure
            body = html.unescape(re.sub(r"<[^>]+>", "", part)).strip("\n")
            out.append("\n\n" + body + "\n\n")
            continue
        part = re.sub(r"\s+", " ", part)
        part = re.sub(r"<br\b[^>]*>", "\n", part, flags=re.I)
        part = re.sub(r"<li\b[^>]*>", "\n\n- ", part, flags=re.I)
        part = re.sub(r"</?(p|div|h[1-6]|ul|ol|dl|dt|dd|tr|table|blockquote|section|title|body|caption)\b[^>]*>",
                      "\n\n", part, flags=re.I)
        part = re.sub(r"</?(td|th)\b[^>]*>", " ", part, flags=re.I)
        part = html.unescape(re.sub(r"<[^>]+>", "", part))
        out.append("\n".join(line.strip() for line in part.split("\n")))
    return "".join(out)


# reStructuredText directives whose body is not prose/code worth keeping
_RST_DROP_DIRECTIVES = {
    "toctree", "index", "highlight", "image", "figure", "raw", "include", "literalinclude", "contents",
    "currentmodule", "module", "sectionauthor", "moduleauthor", "testsetup", "testcleanup", "kernel-doc",
    "tabularcolumns", "only", "ifconfig", "audit-event", "audit-event-table", "highlightlang", "csv-table",
    "kernel-feat", "kernel-abi", "kernel-include", "c:namespace", "c:namespace-push", "c:namespace-pop",
    "default-role", "program", "cmdoption", "rubric", "impl-detail", "availability", "spelling:word-list",
    "productionlist", "sectnum", "epigraph", "admonition-title", "substitution",
}


def strip_rst(text):
    """reStructuredText -> plain text: drop comments, targets, section underlines and layout-only
    directives; keep directive bodies (notes, code) and the text of inline roles and links."""
    lines = text.split("\n")
    out, i = [], 0
    # section underlines, transitions and table borders ("=====  ====", "+----+----+")
    adorn = re.compile(r"^\s*(?=.*([=\-~^\"'`#*+_])\1\1)[=\-~^\"'`#*+_.:| ]+$")
    while i < len(lines):
        line = lines[i]
        m = re.match(r"^(\s*)\.\.(\s+(.*))?$", line)
        if m:
            indent = len(m.group(1))
            rest = (m.group(3) or "").strip()
            d = re.match(r"^([\w:.-]+)::\s*(.*)$", rest)
            keep_body = d is not None and d.group(1).lower() not in _RST_DROP_DIRECTIVES
            if d and keep_body and d.group(2) and not d.group(1).startswith(("code", "sourcecode")):
                out.append(" " * indent + d.group(2))  # e.g. the signature of `.. function:: f(x)`
            i += 1
            if keep_body:  # drop the option lines; the body is processed like any other text
                while i < len(lines) and re.match(r"^\s+:[\w -]+:( |$)", lines[i]):
                    i += 1
                continue
            while i < len(lines):  # comment, target or layout directive: drop its indented body
                nxt = lines[i]
                if nxt.strip() and len(nxt) - len(nxt.lstrip()) <= indent:
                    break
                i += 1
            continue
        if adorn.match(line):
            i += 1
            continue
        out.append(line)
        i += 1
    text = "\n".join(out)
    text = re.sub(r":[\w.:+-]+:`([^`]*)`", lambda m: _rst_ref_text(m.group(1)), text)  # :func:`open`
    text = re.sub(r"`([^`<]*?)\s*<[^`>]*>`_{1,2}", r"\1", text)  # `text <url>`_
    text = re.sub(r"``(.+?)``", r"\1", text)
    text = re.sub(r"`([^`\n]+)`_{0,2}", r"\1", text)
    text = re.sub(r"\*\*(\S(?:[^*\n]*\S)?)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*\\])\*(\S(?:[^*\n]*?\S)?)\*(?![\w*])", r"\1", text)
    text = re.sub(r"\s*\[(#\w*|\d+|\*)\]_", "", text)  # footnote references
    text = re.sub(r"(?<=[A-Za-z0-9])__?(?=[\s.,;:!?)]|$)", "", text, flags=re.M)  # reference_
    text = re.sub(r"\|(\w[\w -]*)\|", r"\1", text)  # substitutions
    text = re.sub(r"^\s*::\s*$", "", text, flags=re.M)
    text = re.sub(r"(\S)::$", r"\1:", text, flags=re.M)
    return text


def _rst_ref_text(inner):
    m = re.match(r"^(.*?)\s*<[^>]*>$", inner, re.S)
    if m and m.group(1):
        return m.group(1)
    return inner.lstrip("~!")


_POD_ENTITIES = {"lt": "<", "gt": ">", "verbar": "|", "sol": "/", "quot": '"', "amp": "&", "apos": "'"}


def _pod_code(m):
    code, inner = m.group(1), m.group(2)
    if code in "XZ":
        return ""
    if code == "E":
        if inner.isdigit():
            return chr(int(inner))
        if inner.lower().startswith("0x"):
            return chr(int(inner, 16))
        return _POD_ENTITIES.get(inner, html.unescape(f"&{inner};"))
    if code == "L":
        inner = inner.split("|", 1)[0] if "|" in inner else inner.replace('"', "").lstrip("/")
    return inner


def _pod_format(text):
    """Resolve POD formatting codes: B<x>, C<< x >>, L<text|target>, E<gt>, X<index> ..."""
    text = re.sub(r"([A-Z])<<+\s+(.*?)\s+>>+", _pod_code, text, flags=re.S)
    while True:
        new = re.sub(r"([A-Z])<([^<>]*)>", _pod_code, text)
        if new == text:
            return text
        text = new


def strip_pod(text):
    """Perl POD -> plain text: commands become headings/items, formatting codes lose their markup."""
    out, skip = [], False
    for para in re.split(r"\n\s*\n", text):
        if para.startswith("="):
            cmd, _, rest = para.partition(" ")
            cmd = cmd.split("\n")[0]
            if cmd == "=begin":
                skip = True
            elif cmd == "=end":
                skip = False
            elif not skip and cmd.startswith("=head"):
                out.append(_pod_format(rest.strip()))
            elif not skip and cmd == "=item":
                item = _pod_format(re.sub(r"^(\*|\d+\.?)\s*", "", rest.strip())).strip()
                if item:
                    out.append("- " + item)
            continue
        if skip:
            continue
        # ordinary paragraphs carry formatting codes; indented (verbatim) ones are code
        out.append(para if para[:1].isspace() else _pod_format(para))
    return "\n\n".join(out)


def strip_asciidoc(text):
    """AsciiDoc (git's documentation) -> plain text."""
    out = []
    for line in text.split("\n"):
        if re.match(r"^(-{3,}|={3,}|~{3,}|\^{3,}|\.{4,}|\+{4,}|\*{4,}|_{4,}|\+)$", line.strip()):
            continue  # underlines and block delimiters
        if re.match(r"^\s*(\[\[?[^\]]*\]\]?|include::.*|ifn?def::.*|endif::.*|:\w[\w-]*:.*)$", line):
            continue  # attributes, anchors, includes
        out.append(line)
    text = "\n".join(out)
    text = re.sub(r"linkgit:([\w.-]+)\[(\d)\]", r"\1(\2)", text)
    text = re.sub(r"\b(?:link|https?):[^\s\[]*\[([^\]]*)\]", lambda m: " ".join(m.group(1).split()), text)
    text = re.sub(r"^={1,5} (?=\S)", "", text, flags=re.M)  # "== Section" headings
    text = re.sub(r"<<([^,>]+)(,([^>]+))?>>", lambda m: m.group(3) or m.group(1), text)
    for k, v in {"{litdd}": "--", "{caret}": "^", "{tilde}": "~", "{startsb}": "[", "{endsb}": "]",
                 "{apostrophe}": "'", "{backtick}": "`", "{plus}": "+", "{empty}": ""}.items():
        text = text.replace(k, v)
    return text

