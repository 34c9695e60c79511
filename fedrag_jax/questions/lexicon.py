"""Word lists the question rules match against: countries, nationality adjectives, nouns.

Plain data, written for these rules (no external source). A country is listed with the
adjectives English uses for its people; historical states are adjectives only (a person can
be "a Roman emperor", but no passage today is "a city in the Roman Empire" as its country).
"""

from __future__ import annotations

# country -> nationality adjectives (the first is the usual one)
COUNTRIES: dict[str, tuple[str, ...]] = {
    "Afghanistan": ("Afghan",), "Albania": ("Albanian",), "Algeria": ("Algerian",),
    "Andorra": ("Andorran",), "Angola": ("Angolan",), "Argentina": ("Argentine", "Argentinian"),
    "Armenia": ("Armenian",), "Australia": ("Australian",), "Austria": ("Austrian",),
    "Azerbaijan": ("Azerbaijani",), "Bahrain": ("Bahraini",), "Bangladesh": ("Bangladeshi",),
    "Barbados": ("Barbadian",), "Belarus": ("Belarusian",), "Belgium": ("Belgian",),
    "Belize": ("Belizean",), "Benin": ("Beninese",), "Bhutan": ("Bhutanese",),
    "Bolivia": ("Bolivian",), "Bosnia and Herzegovina": ("Bosnian",),
    "Botswana": ("Botswanan",), "Brazil": ("Brazilian",), "Brunei": ("Bruneian",),
    "Bulgaria": ("Bulgarian",), "Burkina Faso": ("Burkinabe",), "Burundi": ("Burundian",),
    "Cambodia": ("Cambodian",), "Cameroon": ("Cameroonian",), "Canada": ("Canadian",),
    "Chad": ("Chadian",), "Chile": ("Chilean",), "China": ("Chinese",),
    "Colombia": ("Colombian",), "Costa Rica": ("Costa Rican",), "Croatia": ("Croatian",),
    "Cuba": ("Cuban",), "Cyprus": ("Cypriot",), "Czech Republic": ("Czech",),
    "Denmark": ("Danish",), "Djibouti": ("Djiboutian",), "Dominican Republic": ("Dominican",),
    "Ecuador": ("Ecuadorian",), "Egypt": ("Egyptian",), "El Salvador": ("Salvadoran",),
    "Eritrea": ("Eritrean",), "Estonia": ("Estonian",), "Eswatini": ("Swazi",),
    "Ethiopia": ("Ethiopian",), "Fiji": ("Fijian",), "Finland": ("Finnish",),
    "France": ("French",), "Gabon": ("Gabonese",), "Georgia": ("Georgian",),
    "Germany": ("German",), "Ghana": ("Ghanaian",), "Greece": ("Greek",),
    "Guatemala": ("Guatemalan",), "Guinea": ("Guinean",), "Guyana": ("Guyanese",),
    "Haiti": ("Haitian",), "Honduras": ("Honduran",), "Hungary": ("Hungarian",),
    "Iceland": ("Icelandic",), "India": ("Indian",), "Indonesia": ("Indonesian",),
    "Iran": ("Iranian",), "Iraq": ("Iraqi",), "Ireland": ("Irish",), "Israel": ("Israeli",),
    "Italy": ("Italian",), "Ivory Coast": ("Ivorian",), "Jamaica": ("Jamaican",),
    "Japan": ("Japanese",), "Jordan": ("Jordanian",), "Kazakhstan": ("Kazakh",),
    "Kenya": ("Kenyan",), "Kuwait": ("Kuwaiti",), "Kyrgyzstan": ("Kyrgyz",), "Laos": ("Laotian",),
    "Latvia": ("Latvian",), "Lebanon": ("Lebanese",), "Lesotho": ("Basotho",),
    "Liberia": ("Liberian",), "Libya": ("Libyan",), "Liechtenstein": ("Liechtensteiner",),
    "Lithuania": ("Lithuanian",), "Luxembourg": ("Luxembourgish",),
    "Madagascar": ("Malagasy",), "Malawi": ("Malawian",), "Malaysia": ("Malaysian",),
    "Maldives": ("Maldivian",), "Mali": ("Malian",), "Malta": ("Maltese",),
    "Mauritania": ("Mauritanian",), "Mauritius": ("Mauritian",), "Mexico": ("Mexican",),
    "Moldova": ("Moldovan",), "Monaco": ("Monegasque",), "Mongolia": ("Mongolian",),
    "Montenegro": ("Montenegrin",), "Morocco": ("Moroccan",), "Mozambique": ("Mozambican",),
    "Myanmar": ("Burmese",), "Namibia": ("Namibian",), "Nepal": ("Nepali", "Nepalese"),
    "Netherlands": ("Dutch",), "New Zealand": ("New Zealand",), "Nicaragua": ("Nicaraguan",),
    "Niger": ("Nigerien",), "Nigeria": ("Nigerian",), "North Korea": ("North Korean",),
    "North Macedonia": ("Macedonian",), "Norway": ("Norwegian",), "Oman": ("Omani",),
    "Pakistan": ("Pakistani",), "Panama": ("Panamanian",),
    "Papua New Guinea": ("Papua New Guinean",),
    "Paraguay": ("Paraguayan",), "Peru": ("Peruvian",), "Philippines": ("Filipino",),
    "Poland": ("Polish",), "Portugal": ("Portuguese",), "Qatar": ("Qatari",),
    "Romania": ("Romanian",), "Russia": ("Russian",), "Rwanda": ("Rwandan",),
    "Samoa": ("Samoan",), "San Marino": ("Sammarinese",), "Saudi Arabia": ("Saudi",),
    "Senegal": ("Senegalese",), "Serbia": ("Serbian",), "Sierra Leone": ("Sierra Leonean",),
    "Singapore": ("Singaporean",), "Slovakia": ("Slovak",), "Slovenia": ("Slovene", "Slovenian"),
    "Somalia": ("Somali",), "South Africa": ("South African",), "South Korea": ("South Korean",),
    "South Sudan": ("South Sudanese",), "Spain": ("Spanish",), "Sri Lanka": ("Sri Lankan",),
    "Sudan": ("Sudanese",), "Suriname": ("Surinamese",), "Sweden": ("Swedish",),
    "Switzerland": ("Swiss",), "Syria": ("Syrian",), "Taiwan": ("Taiwanese",),
    "Tajikistan": ("Tajik",), "Tanzania": ("Tanzanian",), "Thailand": ("Thai",),
    "Togo": ("Togolese",), "Tonga": ("Tongan",), "Trinidad and Tobago": ("Trinidadian",),
    "Tunisia": ("Tunisian",), "Turkey": ("Turkish",), "Turkmenistan": ("Turkmen",),
    "Uganda": ("Ugandan",), "Ukraine": ("Ukrainian",), "United Arab Emirates": ("Emirati",),
    "United Kingdom": ("British",), "United States": ("American",), "Uruguay": ("Uruguayan",),
    "Uzbekistan": ("Uzbek",), "Vanuatu": ("Vanuatuan",), "Venezuela": ("Venezuelan",),
    "Vietnam": ("Vietnamese",), "Yemen": ("Yemeni",), "Zambia": ("Zambian",),
    "Zimbabwe": ("Zimbabwean",),
    # the small and island states too: a place "in Vatican City, ... Rome, Italy" must not
    # be read as in Italy alone
    "Vatican City": ("Vatican",), "Kosovo": ("Kosovar",), "Palau": ("Palauan",),
    "Nauru": ("Nauruan",), "Kiribati": ("I-Kiribati",), "Tuvalu": ("Tuvaluan",),
    "Marshall Islands": ("Marshallese",), "Micronesia": ("Micronesian",),
    "Solomon Islands": ("Solomon Islander",), "Seychelles": ("Seychellois",),
    "Comoros": ("Comorian",), "Cape Verde": ("Cape Verdean",),
    "São Tomé and Príncipe": ("Santomean",), "Equatorial Guinea": ("Equatoguinean",),
    "Guinea-Bissau": ("Bissau-Guinean",), "The Gambia": ("Gambian",),
    "Central African Republic": ("Central African",), "Republic of the Congo": ("Congolese",),
    "Democratic Republic of the Congo": ("Congolese",), "East Timor": ("Timorese",),
    "Saint Lucia": ("Saint Lucian",), "Grenada": ("Grenadian",), "Dominica": ("Dominican",),
    "Antigua and Barbuda": ("Antiguan",), "Saint Kitts and Nevis": ("Kittitian",),
    "Saint Vincent and the Grenadines": ("Vincentian",), "The Bahamas": ("Bahamian",),
    "Palestine": ("Palestinian",),
}

# other names a passage may use for a listed country (each is also an acceptable answer)
COUNTRY_ALIASES: dict[str, tuple[str, ...]] = {
    "United States": ("United States of America", "USA", "US", "U.S."),
    "United Kingdom": ("UK", "Great Britain", "Britain"),
    "Czech Republic": ("Czechia",), "Ivory Coast": ("Côte d'Ivoire",),
    "Myanmar": ("Burma",), "Eswatini": ("Swaziland",), "Turkey": ("Türkiye",),
    "East Timor": ("Timor-Leste",), "Cape Verde": ("Cabo Verde",), "The Gambia": ("Gambia",),
    "Democratic Republic of the Congo": ("DR Congo", "DRC"),
    "North Macedonia": ("Macedonia",), "Netherlands": ("Holland",),
}

# nationality adjectives of peoples and states that are not (or no longer) listed countries
OTHER_NATIONALITIES: tuple[str, ...] = (
    "English", "Scottish", "Welsh", "Northern Irish", "Flemish", "Catalan", "Basque",
    "Bavarian", "Prussian", "Soviet", "Yugoslav", "Czechoslovak", "Roman", "Byzantine",
    "Ottoman", "Persian", "Babylonian", "Assyrian", "Athenian", "Spartan", "Macedonian",
    "Carthaginian", "Venetian", "Florentine", "Genoese", "Neapolitan", "Sicilian", "Castilian",
    "Aragonese", "Frankish", "Saxon", "Anglo-Saxon", "Norman", "Viking", "Mongol", "Tibetan",
    "Kurdish", "Palestinian", "Puerto Rican", "Hong Kong", "Bohemian", "Austro-Hungarian",
    "Sumerian", "Akkadian", "Hittite", "Phoenician", "Aztec", "Inca", "Mayan", "Manchu",
    "Korean", "Congolese", "Quebecois", "Tamil", "Bengali", "Punjabi", "Arab", "Gaulish",
    "Ancient Greek", "Ancient Roman", "Ancient Egyptian", "Mughal",
)

NATIONALITIES: frozenset[str] = frozenset(
    {adj for adjs in COUNTRIES.values() for adj in adjs} | set(OTHER_NATIONALITIES))

# nouns that make "X is a <noun> in <country>" a statement about where a place is
PLACE_NOUNS: tuple[str, ...] = (
    "city", "town", "village", "capital", "metropolis", "municipality", "port", "river",
    "lake", "mountain", "mountains", "mountain range", "range", "volcano", "island",
    "islands", "archipelago", "peninsula", "region", "province", "state", "county",
    "district", "desert", "plateau", "valley", "waterfall", "falls", "canyon", "gorge",
    "bay", "gulf", "strait", "canal", "reservoir", "glacier", "forest", "park",
    "national park", "basin", "delta", "oasis", "site", "cathedral", "palace", "temple",
    "mosque", "church", "castle", "fortress", "monument", "museum", "university", "building",
    "tower", "bridge", "dam", "prefecture", "oblast", "governorate", "emirate", "territory",
    "conurbation", "megacity", "settlement", "commune",
)

# occupational nouns: one of them after the nationality adjective marks a person
PERSON_NOUNS: frozenset[str] = frozenset("""
actor actress activist admiral aristocrat architect artist astronaut astronomer athlete
author aviator bandleader banker baritone bishop boxer businessman businesswoman cardinal
cartographer cartoonist chancellor chef chemist choreographer cinematographer cleric
comedian commander composer conductor conqueror cosmonaut cricketer critic cyclist dancer
designer dictator diplomat director dramatist economist editor educator emperor empress
engineer entertainer entrepreneur essayist explorer fashion film filmmaker footballer
general geographer geologist golfer guitarist historian humanist illustrator industrialist
inventor journalist judge jurist king leader librettist linguist lyricist magnate
mathematician merchant missionary monarch monk musician mystic naturalist navigator
neurologist neuroscientist novelist nun nurse officer painter pharaoh philanthropist
philosopher photographer physician physicist physiologist pianist pilot playwright poet
politician pope preacher president priest prince princess producer professor prophet
psychiatrist psychoanalyst psychologist publisher queen rapper reformer revolutionary
rapper ruler saint scholar scientist screenwriter sculptor senator singer singer-songwriter
soldier songwriter soprano sovereign statesman stateswoman sultan surgeon swimmer tenor
theologian theorist tsar violinist warlord writer zoologist biologist botanist chemist
economist entomologist anthropologist sociologist archaeologist polymath courtesan
lawyer jurist pianist organist printer sprinter tennis basketball racing wrestler
""".split())
