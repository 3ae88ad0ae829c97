"""Web pages that look like real ones: a head with charset and title, navigation, articles in
Russian, Kazakh and English, inline images, a footer; 50-500 KiB.

The size matters twice: real pages are that big (so body caps and truncation are exercised), and
their bytes are a mix of text, which gzip shrinks to a fifth, and images, which it cannot shrink.
A page made only of padding would compress to nothing and make throttling invisible on the wire.
Pages are deterministic per domain (seeded), so a capture of the same scenario is reproducible in
shape.
"""

from __future__ import annotations

import base64
import hashlib
import html
import random

MIN_SIZE = 50 * 1024
MAX_SIZE = 500 * 1024

_SENTENCES = (
    "Правительство Республики Казахстан утвердило новый план развития цифровой инфраструктуры.",
    "В Алматы прошёл форум, посвящённый свободе слова и доступу к информации.",
    "Курс тенге к доллару на сегодня установлен Национальным банком.",
    "Жители Уральска жалуются на перебои с водоснабжением в нескольких микрорайонах.",
    "Эксперты обсудили, как изменится рынок автомобилей после девальвации.",
    "Астанада жаңа мектеп ашылды, оған бір мың бала қабылданады.",
    "Қазақстан Республикасының азаматтары үшін жаңа қызметтер іске қосылды.",
    "The national statistics office published the quarterly figures on Monday.",
    "Readers can subscribe to the newsletter to get the morning digest by e-mail.",
    "Погода в Астане: без осадков, ночью до минус пятнадцати градусов.",
    "Комментарии читателей публикуются после модерации.",
    "Новые правила регистрации доменных имён в зоне .kz вступают в силу с первого числа.",
)
_NAV = ("Главная", "Новости", "Экономика", "Общество", "Спорт", "Культура", "Контакты", "Қазақша", "English")


def default_size(domain: str) -> int:
    """A size in [MIN_SIZE, MAX_SIZE], fixed per domain."""
    h = int.from_bytes(hashlib.sha256(domain.encode()).digest()[:4], "big")
    return MIN_SIZE + h % (MAX_SIZE - MIN_SIZE)


def page(title: str, domain: str, size: int = 0, *, content: str = "", incompressible: float = 0.35) -> bytes:
    """An HTML page of about ``size`` bytes (0: the domain's default size), ``incompressible`` of
    them inline image data."""
    size = size or default_size(domain)
    rng = random.Random(domain)
    esc = html.escape
    head = (
        "<!DOCTYPE html>\n<html lang=\"ru\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{esc(title)}</title>\n"
        f"<link rel=\"canonical\" href=\"https://{esc(domain)}/\">\n"
        "<style>body{font-family:sans-serif;margin:0}nav a{margin:0 .5em}article{max-width:60em}</style>\n"
        "</head>\n<body>\n<header><nav>"
        + "".join(f"<a href=\"/{i}/\">{esc(n)}</a>" for i, n in enumerate(_NAV))
        + f"</nav></header>\n<main>\n{content or f'<h1>{esc(title)}</h1>'}\n"
    )
    tail = f"</main>\n<footer><p>© {esc(domain)}, 2014. Все права защищены.</p></footer>\n</body>\n</html>\n"
    parts = [head]
    budget = size - len(head.encode()) - len(tail.encode())
    image_budget = int(budget * incompressible)
    n = 0
    while budget > 0:
        n += 1
        if image_budget > 0:
            raw = rng.randbytes(min(image_budget * 3 // 4, 12 * 1024))
            img = (f"<figure><img alt=\"\" width=\"640\" height=\"360\" src=\"data:image/jpeg;base64,"
                   f"{base64.b64encode(raw).decode()}\"></figure>\n")
            image_budget -= len(img)
            budget -= len(img)
            parts.append(img)
        text = " ".join(rng.choice(_SENTENCES) for _ in range(rng.randint(6, 14)))
        art = (f"<article id=\"a{n}\"><h2>{esc(rng.choice(_SENTENCES)[:60])}</h2>\n"
               f"<p>{esc(text)}</p></article>\n")
        enc = art.encode()
        if len(enc) > budget:
            art = "<!--" + "." * max(budget - 7, 0) + "-->"
            enc = art.encode()
        parts.append(art)
        budget -= len(enc)
    parts.append(tail)
    return "".join(parts).encode()


def blockpage(title: str, body_html: str) -> bytes:
    return (
        "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>"
        f"{html.escape(title)}</title></head>\n<body>{body_html}</body></html>\n"
    ).encode()
