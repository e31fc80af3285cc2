"""The documents are tested like the code: README.md, the tutorial, its appendices and the quick reference.

(a) every ```python block runs, in a fresh namespace, against the tiny demo pipeline and two tiny
    LoRAs trained by the script (conftest.two_loras); a few textual substitutions turn the real
    model id, the output folders, fp16 and CUDA into their tiny CPU equivalents (see substitute());
    a block right after `<!-- doc-test: skip (reason) -->` is skipped with that reason;
(b) the tutorial's chapter-4 subsections are the script's numbered section banners, in order,
    chapter 4 opens with an exact copy of the script's compute_loss, and the appendices hold an exact
    copy of its training loop, train;
(c) every `--NAME=value` and every UPPER_CASE name the documents mention is a real setting
    (or on a short allow-list), every value given is one the script accepts, and every
    hyperparameter table row states the script's real default;
(d) page citations of the LoRA paper agree with the verified citation sheet, and "99%" appears
    only where it is denied as a paper claim.
"""
import ast
import os
import re

import pytest

import lora_complete_example as lce
import lora_dreambooth_example as ldb
from conftest import REPO_ROOT, SCRIPT
from lora_tools.config import UserError, parse_value

DOCS = ["README.md", "diffusion_lora_finetuning_tutorial.md", "lora_quick_reference.md", "diffusion_lora_appendix.md"]
TUTORIAL = "diffusion_lora_finetuning_tutorial.md"
APPENDIX = "diffusion_lora_appendix.md"  # the tutorial's paper details and engineering notes, moved out of chapters 1-4


def read(name):
    with open(os.path.join(REPO_ROOT, name), encoding="utf-8") as f:
        return f.read()


# ----------------------------------------------------------------------------- markdown parsing
FENCE_RE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.S | re.M)
MARKER_RE = re.compile(r"<!--\s*doc-test:\s*([\w-]+)\s*(?:\((.*?)\))?\s*-->")


def fenced_blocks(text):
    """[(language, code, markers, line)] for every fenced block; markers: {name: reason} of the
    `<!-- doc-test: name (reason) -->` comments on the lines right before the fence."""
    blocks = []
    for m in FENCE_RE.finditer(text):
        before = text[: m.start()].rstrip("\n").split("\n")
        markers = {}
        while before and MARKER_RE.fullmatch(before[-1].strip()):
            mm = MARKER_RE.fullmatch(before.pop().strip())
            markers[mm.group(1)] = (mm.group(2) or "").strip()
        blocks.append((m.group(1).lower(), m.group(2), markers, text.count("\n", 0, m.start()) + 1))
    return blocks


def python_blocks():
    """pytest params, one per ```python block of each document, id '<file>-block<N>'."""
    params = []
    for name in DOCS:
        if not os.path.isfile(os.path.join(REPO_ROOT, name)):
            continue
        i = 0
        for lang, code, markers, line in fenced_blocks(read(name)):
            if lang not in ("python", "py"):
                continue
            i += 1
            marks = [pytest.mark.skip(reason=f"{name} block {i}: {markers['skip'] or 'marked skip'}")] if "skip" in markers else []
            params.append(pytest.param(name, i, line, code, markers, id=f"{name}-block{i}", marks=marks))
    return params


def prose_and_code(text):
    """The text with each fenced block's lines turned into separate paragraphs (a citation in a
    code line must not run on into the next line)."""
    return FENCE_RE.sub(lambda m: "\n\n" + m.group(2).replace("\n", "\n\n") + "\n\n", text)


# ----------------------------------------------------------------------------- (a) python blocks
REAL_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"
COPIED_FROM_THE_SCRIPT = {"compute_loss", "train"}  # the copies in chapter 4 and the appendix, compared with the script's


def substitute(code, model_dir, lora_dirs):
    """The explicit substitution table: real model, GPU and sizes -> the tiny CPU setup."""
    table = [
        (re.escape(REAL_MODEL_ID), model_dir.replace("\\", "/")),
        (r"\bmy_second_lora_model\b", lora_dirs["my_second_lora_model"]),
        (r"\bmy_lora_model\b", lora_dirs["my_lora_model"]),
        (r"\b((?:torch_)?dtype)=torch\.float16\b", r"\1=torch.float32"),
        (r"""\.to\((["'])cuda\1\)""", '.to("cpu")'),
        (r"\bheight=512\b", "height=64"),
        (r"\bwidth=512\b", "width=64"),
        (r"\bnum_inference_steps=\d+", "num_inference_steps=2"),
    ]
    for pattern, replacement in table:
        code = re.sub(pattern, lambda m, r=replacement: m.expand(r) if "\\" in r else r, code)
    return code


@pytest.fixture(scope="session")
def doc_loras(two_loras):
    """The two small LoRAs the script trained (conftest): 'my_lora_model' and 'my_second_lora_model'."""
    return {name: run.out.replace("\\", "/") for name, run in two_loras.items()}


@pytest.mark.parametrize("doc, index, line, code, markers", python_blocks())
def test_python_block_runs(doc, index, line, code, markers, tiny_model_dir, doc_loras, tmp_path, monkeypatch):
    code = substitute(code, tiny_model_dir, doc_loras)
    if "cuda" in code.lower() and "cuda-ok" not in markers:
        pytest.fail(f"{doc} block {index} (line {line}) still mentions CUDA after the substitutions; make it run on a "
                    f"CPU, or mark it <!-- doc-test: cuda-ok (why) --> or <!-- doc-test: skip (why) -->:\n{code}")
    body = ast.parse(code).body
    defined = [n.name for n in body if isinstance(n, (ast.FunctionDef, ast.ClassDef))]
    if defined and all(isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom)) for n in body):
        # a block that only defines is tested only where something calls it: the script's own functions, copied
        # (test_chapter_4_shows_the_real_loss_and_loop), run by every training run of the suite
        assert set(defined) <= COPIED_FROM_THE_SCRIPT, f"{doc} block {index} defines {defined}, which nothing calls"
        return
    monkeypatch.chdir(tmp_path)  # files a snippet writes land in a scratch folder
    namespace = {"__name__": f"doc_{index}"}
    try:
        exec(compile(code, f"{doc}, block {index} (line {line})", "exec"), namespace)
    except Exception as e:
        raise AssertionError(f"{doc} block {index} (line {line}) failed: {type(e).__name__}: {e}\n"
                             f"--- the block as run ---\n{code}") from e


def test_the_documents_have_python_examples():
    counts = {name: sum(lang == "python" for lang, *_ in fenced_blocks(read(name))) for name in DOCS[1:]}
    assert all(counts.values()), counts


# ----------------------------------------------------------------------------- (b) chapter 4 = the banners
def script_sections():
    """[(number, title)] of the `# N. Title` lines framed by `# ====` lines in the script."""
    with open(SCRIPT, encoding="utf-8") as f:
        lines = f.read().splitlines()
    found = []
    for i in range(1, len(lines) - 1):
        m = re.fullmatch(r"#\s*(\d+)\.\s+(.+?)\s*", lines[i])
        if m and lines[i - 1].startswith("# ====") and lines[i + 1].startswith("# ===="):
            found.append((int(m.group(1)), m.group(2)))
    return found


def short_title(title):
    """The banner's title without a trailing '(citation)' or a ': subtitle'."""
    title = re.sub(r"\s*\([^()]*\)\s*$", "", title)
    return title.split(": ", 1)[0].strip()


def tutorial_chapter4():
    text = read(TUTORIAL)
    m = re.search(r"^## 4\. .*?$(.*?)^## 5\. ", text, re.S | re.M)
    assert m, "the tutorial has no chapter 4 followed by a chapter 5"
    return [(int(a), int(b), t.strip()) for a, b, t in re.findall(r"^### (\d+)\.(\d+)\s+(.+)$", m.group(1), re.M)]


def test_chapter_4_mirrors_the_script_sections():
    sections = script_sections()
    headings = tutorial_chapter4()
    assert all(ch == 4 for ch, _, _ in headings), headings
    assert [n for _, n, _ in headings] == [n for n, _ in sections], (headings, sections)
    for (_, n, heading), (_, title) in zip(headings, sections):
        assert heading in (title, short_title(title)), f"### 4.{n} is {heading!r}; the script's section {n} is {title!r}"


def chapter_4():
    m = re.search(r"^## 4\. .*?$(.*?)^## 5\. ", read(TUTORIAL), re.S | re.M)
    assert m, "the tutorial has no chapter 4 followed by a chapter 5"
    return m.group(1)


@pytest.mark.parametrize("name, where", [("compute_loss", "chapter 4"), ("train", APPENDIX)])
def test_chapter_4_shows_the_real_loss_and_loop(name, where):
    """Chapter 4 shows the script's compute_loss, and the appendix its training loop, train(), copied:
    each copy must be the code that runs (and is run by every test of a training run)."""
    source = open(SCRIPT, encoding="utf-8").read()
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == name)
    real = ast.get_source_segment(source, node).strip()
    text = chapter_4() if where == "chapter 4" else read(APPENDIX)
    copies = [code.strip() for lang, code, _, _ in fenced_blocks(text) if lang == "python" and f"def {name}(" in code]
    assert copies == [real], f"the copy of {name} in {where} differs from the script's (copy it again)"


def test_chapter_4_is_written():
    text = read(TUTORIAL)
    assert "<!-- chapter 4" not in text and "<!-- chapter 5" not in text


# ----------------------------------------------------------------------------- (c) settings named in the documents
MISSPELT_EXAMPLES = {"LORA_RNAK"}  # the documents' example of a misspelt setting and its error message
ALLOWED_NON_CONFIG = {
    "NAME",  # the placeholder in "--NAME=value"
    "UPPER_CASE", "CONFIG_KEYS",  # words about the constants, not constants
    *MISSPELT_EXAMPLES,
    "CUDA_VISIBLE_DEVICES", "HF_TOKEN", "HF_HUB_OFFLINE", "HF_HOME", "OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM",
    "RANK",  # set by accelerate in each process
}
# UPPER_CASE words with an underscore; a one-letter first part (W_Q, L_LDM) is maths, not a setting
UNDERSCORED_RE = re.compile(r"(?<![\w])[A-Z][A-Z0-9]+(?:_[A-Z0-9]+)+(?![\w])")
INLINE_CODE_RE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
OVERRIDE_RE = re.compile(r"--([A-Z][A-Z0-9_]*)=([^\s`'\")|,;]*(?:,[^\s`'\")|;]+)*)")
SCRIPT_RE = re.compile(r"[\w./-]*?([\w-]+\.py)\b")
MAIN_SCRIPT = os.path.basename(SCRIPT)


def _script_options(name):
    """The --NAME= options of another script of this repository: its top-level UPPER_CASE
    constants (a configurator like ours) and any "--NAME=" it spells out; None if no such file."""
    paths = [p for p in (os.path.join(REPO_ROOT, name), os.path.join(REPO_ROOT, "benchmarks", name)) if os.path.isfile(p)]
    if not paths:
        return None
    source = open(paths[0], encoding="utf-8").read()
    names = {t.id for node in ast.parse(source).body if isinstance(node, ast.Assign) for t in node.targets
             if isinstance(t, ast.Name) and t.id.isupper()}
    return names | set(re.findall(r"--([A-Z][A-Z0-9_]*)=", source))


def script_at(line, pos):
    """The script a command-line option at `pos` belongs to: the last *.py named before it."""
    found = [m.group(1) for m in SCRIPT_RE.finditer(line, 0, pos)]
    return found[-1] if found else MAIN_SCRIPT


def script_options(name):
    """The --NAME= options of a script of this repository: its settings when it is one of our two
    training scripts, else its top-level UPPER_CASE constants and any "--NAME=" it spells out."""
    if name == "lora_dreambooth_example.py":
        return set(ldb.CONFIG_KEYS)
    return _script_options(name)


def settings_mentioned(text):
    """[(name, line number, line)]: underscored UPPER_CASE words anywhere, and one-word UPPER_CASE
    inline code spans (`SEED`)."""
    names = []
    for lineno, line in enumerate(text.splitlines(), 1):
        names += [(m.group(0), lineno, line) for m in UNDERSCORED_RE.finditer(line)]
        names += [(span, lineno, line) for span in INLINE_CODE_RE.findall(line) if re.fullmatch(r"[A-Z][A-Z0-9]{2,}", span)]
    return names


@pytest.mark.parametrize("doc", DOCS)
def test_every_upper_case_name_is_a_setting(doc):
    known = set(ldb.CONFIG_KEYS) | ALLOWED_NON_CONFIG  # the core script's settings and the DreamBooth script's
    unknown = {}
    mentioned = settings_mentioned(read(doc))
    if doc != APPENDIX:  # the appendix holds what the tutorial moved out; it need not name many settings
        assert len({name for name, _, _ in mentioned} & set(lce.CONFIG_KEYS)) >= 10, "the documents name settings: none found"
    for name, lineno, line in mentioned:
        if name in known:
            continue
        others = [script_options(s) or set() for s in {m.group(1) for m in SCRIPT_RE.finditer(line)} - {MAIN_SCRIPT}]
        if not any(name in o for o in others):  # a setting of another script named on the same line
            unknown.setdefault(name, lineno)
    assert not unknown, (f"{doc} names settings the script does not have: {unknown} (name: line) — fix the spelling, "
                         "or add a name that is not a setting to ALLOWED_NON_CONFIG")


def override_problems(text):
    defaults = {k: getattr(lce, k) for k in lce.CONFIG_KEYS}
    problems, carried = [], None
    for lineno, line in enumerate(text.splitlines(), 1):
        for m in OVERRIDE_RE.finditer(line):
            name, value = m.groups()
            if name == "NAME" or name in MISSPELT_EXAMPLES:
                continue
            script = script_at(line, m.start()) if carried is None or SCRIPT_RE.search(line) else carried
            if script != MAIN_SCRIPT:
                options = script_options(script)
                if options is None:
                    problems.append(f"line {lineno}: --{name} belongs to {script}, which is not in the repository")
                elif name not in options:
                    problems.append(f"line {lineno}: --{name} is not an option of {script}")
                continue
            if name not in defaults:
                problems.append(f"line {lineno}: --{name} is not a setting of {MAIN_SCRIPT}")
            elif value and not value.startswith(("<", "$", "…", "...")):  # not a placeholder or shell variable
                try:
                    parse_value(name, value, defaults[name])
                except UserError as e:
                    problems.append(f"line {lineno}: {e}")
        # a command continued on the next line (a trailing backslash) keeps its script
        carried = (SCRIPT_RE.findall(line)[-1] if SCRIPT_RE.search(line) else carried) if line.rstrip().endswith("\\") else None
    return problems


@pytest.mark.parametrize("doc", DOCS)
def test_every_override_names_a_setting_and_a_valid_value(doc):
    if doc != APPENDIX:
        assert len(OVERRIDE_RE.findall(read(doc))) >= 5, f"{doc} gives --NAME=value examples: none found"
    problems = override_problems(read(doc))
    assert not problems, f"{doc}:\n" + "\n".join(problems)


@pytest.mark.parametrize("doc", DOCS)
def test_hyperparameter_tables_state_the_real_defaults(doc):
    """A table row '| `NAME` | `value` | ...' gives the script's default for NAME."""
    rows = re.findall(r"^\|\s*`([A-Z][A-Z0-9_]*)`\s*\|\s*`([^`]+)`\s*\|", read(doc), re.M)
    wrong = []
    for name, value in rows:
        if name in lce.CONFIG_KEYS:
            default = getattr(lce, name)
            if ast.literal_eval(value) != default:
                wrong.append(f"{name}: the table says {value}, the script's default is {default!r}")
    assert not wrong, f"{doc}: " + "; ".join(wrong)


# ----------------------------------------------------------------------------- (d) citations
# Pages of the LoRA paper (arXiv v2), from /work/shared/citations.md (claims 4, 6-8; rows L5, L9, L15, L16, L20).
LORA_PAGES = {
    ("Section", "4.2"): 5,
    ("Section", "7.1"): 10,
    ("Section", "7.2"): 10,
    ("Table", "5"): 10,
    ("Table", "6"): 10,
    ("Table", "9"): 19,
    ("Eq", "3"): 4,
}
# A clause that names another paper is not about the LoRA paper's pages.
OTHER_SOURCES = ("DDPM", "Ho et al", "Ho,", "LDM", "Rombach", "Min-SNR", "Hang et al", "DoRA", "Liu et al", "LoRA+",
                 "Hayou", "rsLoRA", "Kalajdzievski", "blog", "Cuenca", "Guttenberg", "2006.11239", "2112.10752",
                 "2303.09556", "2402.12354", "2402.09353", "2312.03732")
PAGE_RE = re.compile(r"\b(?:p\.\s?|[Pp]age\s+)(\d+)(?:\s?[–-]\s?(\d+))?")
ITEM_RE = re.compile(r"\b(Section|Sec|Table|Eq)(?:uation)?\.?\s+(\d+(?:\.\d+)*)")
# where a citation clause ends: parentheses, table cells, semicolons, paragraphs, list items, sentences
CLAUSE_END = re.compile(r"[()|;]|\n\s*\n|\n\s*(?:[-*+]|\d+\.)\s|\.\s+(?=[A-Z*\"“])")


def normalise(text):
    text = prose_and_code(text)
    return re.sub(r"\b(Eq(?:uation)?\.?)\s*\((\d+)\)", r"\1 \2", text)  # "Eq. (3)" -> "Eq. 3": no nested parentheses


def clause_around(text, start, end):
    """(clause, before): the text around [start, end) up to the nearest delimiters, and the stretch
    just before the clause (used when the clause itself names no section, table or equation)."""
    left = max((m.end() for m in CLAUSE_END.finditer(text, 0, start)), default=0)
    m = CLAUSE_END.search(text, end)
    right = m.start() if m else len(text)
    lo = max((m.end() for m in CLAUSE_END.finditer(text, 0, max(0, left - 1))), default=0)
    return text[left:right], text[lo:max(lo, left - 1)]


def items_in(text):
    return [("Section" if kind == "Sec" else kind, num) for kind, num in ITEM_RE.findall(text)]


def page_citations(text):
    """[(item, pages, clause)]: each page reference with the section/table/equation it cites."""
    text = normalise(text)
    found = []
    for m in PAGE_RE.finditer(text):
        first = int(m.group(1))
        pages = range(first, int(m.group(2) or first) + 1)
        clause, before = clause_around(text, m.start(), m.end())
        items, context = items_in(clause), clause
        if not items:
            items, context = items_in(before)[-1:], before + clause
        if any(s in context for s in OTHER_SOURCES):
            continue
        found.extend((item, pages, " ".join(clause.split())) for item in items)
    return found


def wrong_lora_pages(text):
    return [(item, list(pages)) for item, pages, _ in page_citations(text) if item in LORA_PAGES and LORA_PAGES[item] not in pages]


@pytest.mark.parametrize("doc", DOCS)
def test_lora_page_citations_match_the_citation_sheet(doc):
    cited = {item for item, _, _ in page_citations(read(doc))} & set(LORA_PAGES)
    assert doc == APPENDIX or len(cited) >= 3, f"{doc} cites the LoRA paper's pages: found only {cited}"
    wrong = [f"{item[0]} {item[1]} cited on p.{pages[0]}{'–' + str(pages[-1]) if len(pages) > 1 else ''} "
             f"(the sheet says p.{LORA_PAGES[item]}): ...{clause[:120]}..."
             for item, pages, clause in page_citations(read(doc)) if item in LORA_PAGES and LORA_PAGES[item] not in pages]
    assert not wrong, f"{doc}:\n" + "\n".join(wrong)


NEGATIONS = ("not a claim", "not a paper claim", "not in the paper", "never states", "does not claim", "no such claim")


@pytest.mark.parametrize("doc", DOCS)
def test_99_percent_is_never_presented_as_a_paper_claim(doc):
    for paragraph in re.split(r"\n\s*\n", read(doc)):
        if "99%" in paragraph:
            flat = " ".join(paragraph.split()).lower().replace("*", "")
            assert any(n in flat for n in NEGATIONS), f"{doc}: '99%' outside a denial: {paragraph[:200]!r}"


# ----------------------------------------------------------------------------- (e) the beginner's path and the links
def chapters_1_to_4():
    text = read(TUTORIAL)
    return text[text.index("\n## 1. "):text.index("\n## 5. ")]


def test_chapters_1_to_4_stay_short():
    """The path a beginner reads in order; paper details and engineering notes go to the appendix."""
    assert len(chapters_1_to_4()) <= 34_000, f"chapters 1-4 have {len(chapters_1_to_4()):,} characters (at most 34,000)"


def github_slug(heading):
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    heading = re.sub(r"[`*]", "", heading.strip()).lower()  # the rendered text: no code or emphasis marks
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def anchors(name):
    text = FENCE_RE.sub("", read(name))  # a "# comment" in a code block is no heading
    return {github_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, re.M)}


@pytest.mark.parametrize("doc", [TUTORIAL, APPENDIX])
def test_internal_links_resolve(doc):
    """Every [text](file.md#anchor) or (#anchor) link of the tutorial and its appendix names a file that
    exists and a heading it has."""
    broken = []
    for target in re.findall(r"\]\((?!https?:)([^)\s]+)\)", FENCE_RE.sub("", read(doc))):
        name, _, anchor = target.partition("#")
        name = name or doc
        if not os.path.isfile(os.path.join(REPO_ROOT, name)):
            broken.append(target)
        elif anchor and name.endswith(".md") and anchor not in anchors(name):
            broken.append(target)
    assert not broken, f"{doc}: links to missing files or headings: {broken}"
